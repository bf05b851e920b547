"""Training and saving under distributed engines, on CPU with 2 processes (gloo): DDP through `accelerate launch`,
FSDP2's `fully_shard` through torchrun, and accelerate's FSDP2 and FSDP1.

Each test is one launch (`tests/launch.py`) of a script of `tests/engines/`, and checks what its rank 0 reports
against the same steps run here in one process on the whole batch (`tests/engines/tiny_training.py`): the engines
average the gradients of equal halves, so they must take the same steps, up to the order of float additions
(`TRAINED_ATOL`). A checkpoint must hold the trained model bit for bit and reload with `AutoModelForCausalLM` as our
class, with the trained model's values and logits (compared with `torch.equal`: the worker computed both with the same
threads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from engines.tiny_training import policy_lora, single_process_run, tiny_language_model, tiny_model
from launch import accelerate_launch, torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead

TRAINED_ATOL = 1e-5  # the ranks' gradients are summed in another order than one backward on the whole batch adds them
SHARDED_ATOL = 1e-6  # FSDP2's forward reads its parameters from the all-gather buffer, the unsharded model its own
OUTPUTS = ("value", "logits")

# accelerate's FSDP2 config (a `fsdp_config` of `accelerate config`): each decoder layer a unit of its own, full state
# dicts; accelerate's `get_state_dict` gathers the full state dict whatever `fsdp_state_dict_type` says.
ACCELERATE_FSDP2 = {
    "distributed_type": "FSDP",
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": True,
        "fsdp_use_orig_params": True,
        "fsdp_offload_params": False,
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_sync_module_states": False,  # FSDP1's plugin refuses it on CPU
    },
}


def reported(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): tensor for key, tensor in tensors.items() if key.startswith(prefix)}


def assert_trained_like_one_process(tensors: dict, name: str, rank_losses: list[list[float]], **model_settings):
    """The trained state dict rank 0 reported is the single-process run's, and every trainable parameter moved (the
    frozen base of a LoRA policy did not); the ranks' mean loss of each step is the whole batch's."""
    model, losses = single_process_run(**model_settings)
    initial = tiny_model(**model_settings).state_dict()
    trained = reported(tensors, f"{name}.trained.")
    assert trained.keys() == model.state_dict().keys()
    for key, parameter in model.named_parameters():
        torch.testing.assert_close(trained[key], parameter.detach(), rtol=0, atol=TRAINED_ATOL, msg=key)
        if parameter.requires_grad:
            # moved by more than the tolerance, so the closeness above says something
            assert (trained[key] - initial[key]).abs().max() > 10 * TRAINED_ATOL, f"{key} did not train"
        else:
            assert torch.equal(trained[key], initial[key]), f"frozen {key} changed"
    rank_means = torch.tensor(rank_losses).mean(0)
    assert rank_losses[0] != rank_losses[1]  # each rank had its own half
    torch.testing.assert_close(rank_means, torch.tensor(losses), rtol=0, atol=TRAINED_ATOL)


def assert_checkpoints_are_the_trained_model(tensors: dict, name: str, checkpoints: dict[str, Path]) -> None:
    """Each checkpoint reloads with `AutoModelForCausalLM` as our class, holding the trained state dict bit for bit,
    with the trained model's values and logits."""
    trained = reported(tensors, f"{name}.trained.")
    for kind, directory in checkpoints.items():
        reloaded = AutoModelForCausalLM.from_pretrained(directory)
        assert type(reloaded) is AutoModelForCausalLMWithValueHead, kind
        state = reloaded.state_dict()
        assert state.keys() == trained.keys(), kind
        assert all(torch.equal(state[key], trained[key]) for key in trained), kind
        for output in OUTPUTS:
            assert torch.equal(tensors[f"{name}.{kind}.{output}"], tensors[f"{name}.{output}.trained"]), (kind, output)


def test_ddp_through_accelerate_trains_like_one_process_and_the_main_process_saves(tmp_path):
    result = accelerate_launch("ddp_accelerate.py", str(tmp_path / "checkpoint"), tmp_path=tmp_path)
    assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["num_processes"] == 2
    assert result["prepared"] == "DistributedDataParallel"
    tensors = load_file(tmp_path / "tensors.safetensors")
    assert_trained_like_one_process(tensors, "ddp", result["losses"])
    assert_checkpoints_are_the_trained_model(tensors, "ddp", {"checkpoint": tmp_path / "checkpoint"})


def test_fsdp2_fully_shard_trains_like_one_process_and_saves_without_a_state_dict(tmp_path):
    # save_pretrained on the sharded model, no state_dict=, on every rank with is_main_process=rank == 0 (as users
    # call it): the full model and a LoRA policy on a base saved here.
    tiny_language_model().save_pretrained(tmp_path / "base")
    checkpoints = {"full": tmp_path / "full", "peft": tmp_path / "peft"}
    arguments = [str(path) for path in (tmp_path / "base", checkpoints["full"], checkpoints["peft"])]
    result = torchrun("fsdp2_fully_shard.py", *arguments, tmp_path=tmp_path)
    tensors = load_file(tmp_path / "tensors.safetensors")
    for name, settings in (("full", {}), ("peft", {"base": tmp_path / "base", "peft_config": policy_lora()})):
        run = result[name]
        assert run["parameter_types"] == ["DTensor"], name  # every parameter was sharded
        assert_trained_like_one_process(tensors, name, [rank["losses"] for rank in run["ranks"]], **settings)
        assert_checkpoints_are_the_trained_model(tensors, name, {"checkpoint": checkpoints[name]})
        for output in OUTPUTS:
            sharded, trained = tensors[f"{name}.{output}.sharded"], tensors[f"{name}.{output}.trained"]
            torch.testing.assert_close(sharded, trained, rtol=0, atol=SHARDED_ATOL)
        # rank 1's save returned after rank 0's write: the checkpoint was there for it
        written = sorted(path.name for path in checkpoints[name].iterdir())
        assert [rank["found"] for rank in run["ranks"]] == [written, written], name
    assert "model.safetensors" in result["full"]["ranks"][1]["found"]
    assert {"adapter_model.safetensors", "value_head.safetensors"} <= set(result["peft"]["ranks"][1]["found"])


def test_accelerate_fsdp2_and_fsdp1_train_like_one_process_and_save(tmp_path):
    result = accelerate_launch("fsdp_accelerate.py", str(tmp_path), config=ACCELERATE_FSDP2, tmp_path=tmp_path)
    # accelerate never turns FSDP on without an accelerator: this config alone gives DDP on CPU (see the worker)
    assert result["picked_on_cpu"] == "DistributedType.MULTI_CPU"
    assert result["config"] == {
        "version": 2,
        "state_dict_type": "StateDictType.FULL_STATE_DICT",
        "wrap": ["LlamaDecoderLayer"],
    }
    assert result["fsdp2"]["prepared"] == "FSDPAutoModelForCausalLMWithValueHead"
    assert result["fsdp2"]["parameter_types"] == ["DTensor"]
    assert result["fsdp1"]["prepared"] == "FullyShardedDataParallel"
    tensors = load_file(tmp_path / "tensors.safetensors")
    for name, kinds in (("fsdp2", ("get_state_dict", "plain")), ("fsdp1", ("get_state_dict",))):
        assert_trained_like_one_process(tensors, name, result[name]["losses"])
        checkpoints = {kind: tmp_path / f"{name}-{kind}" for kind in kinds}
        assert_checkpoints_are_the_trained_model(tensors, name, checkpoints)
