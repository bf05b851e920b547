"""DeepSpeed ZeRO-3 on CPU: 2 processes (gloo) run `engines/deepspeed_zero3.py` once, and the tests here check what
it found against the same models built and trained in this process without DeepSpeed.

Each rank holds an empty shard of every parameter under ZeRO-3 (`zero.Init` partitions them as the model is built), so
what touches tensors outside transformers' own loading must gather them: the head's init and its loads, the saves;
`create_reference_model` refuses.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from architectures import VOCAB_SIZE, tiny_config
from conftest import build_bare
from engines.deepspeed_common import MAX_GRAD_NORM, SEED, STEPS, loss_of, make_optimizer
from filelock import FileLock
from launch import torchrun
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from transformers_vhead import AutoModelForCausalLMWithValueHead

HIDDEN = tiny_config("llama").hidden_size


@pytest.fixture(scope="session")
def zero3(tmp_path_factory, worker_id):
    """The fixtures the worker loads, and what it reported: `(directory, result)`. One launch for the whole run: the
    xdist workers that get a test of this file share it through a lock (pytest-xdist's recipe for a session fixture
    that runs once), as each launch takes two cores for ~20 s."""
    if worker_id == "master":
        return _launch(tmp_path_factory.mktemp("zero3"))
    directory = tmp_path_factory.getbasetemp().parent / "zero3"  # this run's directory, shared by its workers
    with FileLock(f"{directory}.lock"):
        if not (directory / "result.json").exists():
            shutil.rmtree(directory, ignore_errors=True)  # a launch that failed in another worker
            directory.mkdir()
            _launch(directory)
    return directory, json.loads((directory / "result.json").read_text())


def _launch(directory: Path) -> tuple[Path, dict]:
    build_bare("llama").save_pretrained(directory / "plain")
    torch.manual_seed(1)
    AutoModelForCausalLMWithValueHead.from_pretrained(
        directory / "plain", summary_dropout_prob=0.0, v_head_init_strategy="normal"
    ).save_pretrained(directory / "vhead")
    config = tiny_config("llama")
    config.num_labels = 1
    torch.manual_seed(2)
    transformers.LlamaForSequenceClassification(config).save_pretrained(directory / "seqcls")  # `score`, no bias
    build_bare("llama").save_pretrained(directory / "factory")
    generator = torch.Generator().manual_seed(3)
    save_file(
        {"v_head.summary.weight": torch.randn(1, HIDDEN, generator=generator), "v_head.summary.bias": torch.ones(1)},
        directory / "factory" / "value_head.safetensors",
    )
    torch.manual_seed(4)
    AutoModelForCausalLMWithValueHead.from_pretrained(
        directory / "vhead", peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).save_pretrained(directory / "adapter")  # a trained-looking adapter (lora_B not zero), its head beside it
    input_ids = torch.randint(3, VOCAB_SIZE, (4, 8), generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "returns": torch.randn(4, 8, generator=generator),
    }
    save_file(batch, directory / "batch.safetensors")
    return directory, torchrun("deepspeed_zero3.py", str(directory), tmp_path=directory, timeout=240)


def test_zero3_partitions_every_parameter(zero3):
    _, result = zero3
    assert result["world_size"] == 2 and result["zero3_enabled"]
    assert result["fresh_partitioned"]  # so the checks below run on real shards, not on whole replicated tensors


def test_fresh_head_under_zero_init_is_the_head_built_without_zero3(zero3):
    directory, _ = zero3
    head = load_file(directory / "head_fresh.safetensors")
    torch.manual_seed(SEED)  # the same seed: under ZeRO-3 rank 0 draws the head in the same order, then broadcasts it
    expected = AutoModelForCausalLMWithValueHead.from_pretrained(
        directory / "plain", v_head_init_strategy="normal", v_head_initializer_range=0.2
    ).v_head
    assert torch.equal(head["v_head.summary.weight"], expected.summary.weight)
    assert torch.equal(head["v_head.summary.bias"], torch.zeros(1))
    assert head["v_head.summary.weight"].shape == (1, HIDDEN)
    assert 0.14 < head["v_head.summary.weight"].std().item() < 0.26  # N(0, 0.2), not zeros nor nn.Linear's U(±0.18)


def test_saved_heads_load_bit_exactly_under_zero3(zero3):
    directory, _ = zero3
    saved = load_file(directory / "vhead" / "model.safetensors")
    head = load_file(directory / "head_vhead.safetensors")
    assert head.keys() == {"v_head.summary.weight", "v_head.summary.bias"}
    assert all(torch.equal(head[key], saved[key]) for key in head)

    # an HF sequence classifier's bias-free `score`: the weight loads, the bias is zeroed on the whole tensor
    score = load_file(directory / "seqcls" / "model.safetensors")["score.weight"]
    head = load_file(directory / "head_seqcls.safetensors")
    assert torch.equal(head["v_head.summary.weight"], score)
    assert torch.equal(head["v_head.summary.bias"], torch.zeros(1))

    # heads in a file of their own, read after transformers' load: LLaMA-Factory's, and ours beside a PEFT adapter
    for name, file in (("factory", "factory/value_head.safetensors"), ("adapter", "adapter/value_head.safetensors")):
        separate = load_file(directory / file)
        head = load_file(directory / f"head_{name}.safetensors")
        assert separate.keys() == head.keys()
        assert all(torch.equal(head[key], separate[key]) for key in separate), name


def test_zero3_training_matches_one_process(zero3):
    directory, result = zero3
    model = AutoModelForCausalLMWithValueHead.from_pretrained(directory / "vhead", summary_dropout_prob=0.0).train()
    optimizer = make_optimizer(model)
    batch = load_file(directory / "batch.safetensors")
    losses = []
    for _ in range(STEPS):
        loss = loss_of(model, batch)  # the whole batch; each rank had half of it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # DeepSpeed's: the norm over every shard
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    trained = load_file(directory / "trained.safetensors")
    expected = dict(model.named_parameters())
    assert trained.keys() == expected.keys()
    # DeepSpeed steps the same torch SGD on flat fp32 partitions, with the gradients averaged across ranks by a
    # reduce-scatter and clipped by their global norm: the same arithmetic up to summation order, so only float32
    # rounding differs (7e-9 measured, after moves of up to 3e-2).
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(trained["v_head.summary.weight"], load_file(directory / "head_vhead.safetensors")[
        "v_head.summary.weight"
    ])  # fmt: skip
    mean_of_halves = [sum(rank_losses[step] for rank_losses in result["losses"]) / 2 for step in range(STEPS)]
    assert mean_of_halves == pytest.approx(losses, abs=1e-6)


@pytest.mark.parametrize("save", ["saved_state_dict", "saved_gathered"])
def test_zero3_saves_reload_as_the_trained_model(zero3, save):
    """`saved_state_dict`: accelerate's idiom (the engine's consolidated state dict to `save_pretrained`);
    `saved_gathered`: a plain `save_pretrained` inside `deepspeed.zero.GatheredParameters`."""
    directory, _ = zero3
    trained = load_file(directory / "trained.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory / save)
    assert type(reloaded) is AutoModelForCausalLMWithValueHead
    assert reloaded.v_head_source.is_loaded
    parameters = dict(reloaded.named_parameters())
    assert parameters.keys() == trained.keys()
    assert all(torch.equal(parameters[name], tensor) for name, tensor in trained.items())  # fp32 end to end
    assert json.loads((directory / save / "config.json").read_text())["architectures"] == [
        "AutoModelForCausalLMWithValueHead"
    ]


def test_plain_save_of_zero3_shards_is_refused_by_the_writer(zero3):
    _, result = zero3
    writer, other = result["shards_save"]
    assert other is None  # accelerate's idiom passes state_dict=None on the other ranks: they must just return
    assert writer["class"] == "ZeRO3ShardsSaveError"
    assert "DeepSpeed ZeRO-3 shards: saving them would write empty tensors" in writer["message"]
    assert "accelerator.get_state_dict(model)" in writer["message"]
    assert "deepspeed.zero.GatheredParameters" in writer["message"]
    assert result["shards_save_wrote"] == []  # nothing half-written
    assert result["partitioned_after_saves"]


def test_create_reference_model_refuses_zero3_and_changes_nothing(zero3):
    _, result = zero3
    assert result["refusals"] == [{"class": "ReferenceModelError", "value_error": True}] * 2  # shared and full copy
    message = result["refusal_message"]
    assert "DeepSpeed ZeRO-3 is enabled and is not compatible with `create_reference_model()`" in message
    assert "`AutoModelForCausalLM.from_pretrained()`" in message
    assert "model.as_reference()" in message and "model.copy_adapter_as_reference()" in message
    assert result["unchanged_after_refusal"]  # requires_grad and every rank's shard as before, no shared_trunk


def test_adapter_reference_works_under_zero3(zero3):
    """What the refusal above offers for a PEFT policy: `copy_adapter_as_reference()` before `deepspeed.initialize`,
    then `as_reference()` gives the adapter as loaded, while the policy's adapter trains."""
    directory, result = zero3
    assert result["peft_reference_unchanged"]  # a training step left the reference as it was
    assert result["peft_policy_moved"] > 1e-3
    batch = load_file(directory / "batch.safetensors")
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(directory / "adapter").eval()
    with torch.no_grad():
        expected = loaded(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]).logits
    logits = load_file(directory / "reference_logits.safetensors")["logits"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
