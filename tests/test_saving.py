"""Saving value-head models: the files written, sharding, stale-file cleanup, failed saves, and the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from architectures import VOCAB_SIZE
from conftest import build_bare, model_inputs, policy_lora, populate_hub_cache, value_head_class
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, modeling_utils

import transformers_vhead
from transformers_vhead.errors import CheckpointSaveError

HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
STAGING_PREFIX = ".transformers-vhead-staging-"


# --- helpers -------------------------------------------------------------------------------------------------------


def wrap(family: str, tmp_path: Path, seed: int = 0):
    """A value-head model wrapped (fresh head) around a plain tiny model of `family` saved under `tmp_path`."""
    base_dir = tmp_path / f"{family}-base"
    build_bare(family, seed=seed).save_pretrained(base_dir)
    return value_head_class(family).from_pretrained(base_dir).eval()


def perturbed(model):
    """`model` with different head and embedding weights, so a save of it is distinguishable from a save of the
    original."""
    with torch.no_grad():
        model.v_head.summary.weight.add_(1.0)
        model.v_head.summary.bias.add_(1.0)
        model.get_input_embeddings().weight.mul_(2.0)
    return model


def assert_same_weights(expected, actual) -> None:
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert expected_sd.keys() == actual_sd.keys()
    differing = [key for key in expected_sd if not torch.equal(expected_sd[key], actual_sd[key])]
    assert differing == []


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under `directory` (directories as `None`, files with their bytes)."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def shard_names(directory: Path) -> set[str]:
    return {name for name in names(directory) if SHARD_NAME.fullmatch(name)}


def read_index(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def usage_snippet(readme: Path) -> str:
    match = re.search(r"```python\n(.*?)```", readme.read_text(), re.DOTALL)
    assert match is not None, "the model card has no python code block"
    return match.group(1)


# --- the files of a save ---------------------------------------------------------------------------------------------


def test_default_save_writes_exactly_safetensors_configs_and_card(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"

    model.save_pretrained(out)

    assert names(out) == {"model.safetensors", "config.json", "generation_config.json", "README.md"}
    assert not [path for path in out.rglob("*") if path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "transformers-vhead-causal-lm"
    assert config["architectures"] == ["AutoModelForCausalLMWithValueHead"]


def test_default_save_reloads_through_auto_class_bit_exact(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"
    model.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    again = AutoModelForCausalLM.from_pretrained(out).eval()

    assert type(reloaded) is transformers_vhead.AutoModelForCausalLMWithValueHead
    assert set(HEAD_KEYS) <= reloaded.state_dict().keys()
    assert_same_weights(model, reloaded)
    assert reloaded.v_head_source.is_loaded
    assert Path(reloaded.v_head_source.file) == out / "model.safetensors"
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected, first, second = model(**inputs), reloaded(**inputs), again(**inputs)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.value, second.value)
    assert torch.equal(first.logits, expected.logits) and torch.equal(first.value, expected.value)


@pytest.mark.parametrize("layout", ["merged", "sharded", "peft"])
def test_a_reloaded_head_owns_aligned_memory(tmp_path, layout):
    """A loaded tensor is memory-mapped from the checkpoint, at an offset that may be unaligned, where BLAS can take
    another path (values an ulp off the saved model's); the reloaded head gets memory of its own, as allocated."""
    model = wrap("llama", tmp_path)
    if layout == "peft":
        model = value_head_class("llama").from_pretrained(tmp_path / "llama-base", peft_config=policy_lora())
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB" if layout == "sharded" else "50GB")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")

    for name, parameter in reloaded.v_head.named_parameters():
        assert parameter.data_ptr() % 64 == 0, name
        assert parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size(), name
    with torch.no_grad():
        inputs = model_inputs("llama")
        assert torch.equal(reloaded(**inputs).value, model(**inputs).value)


def test_seq2seq_save_reloads_through_auto_seq2seq_class_bit_exact(tmp_path):
    model = wrap("t5", tmp_path)
    out = tmp_path / "out"
    model.save_pretrained(out)

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()

    assert names(out) == {"model.safetensors", "config.json", "generation_config.json", "README.md"}
    assert type(reloaded) is transformers_vhead.AutoModelForSeq2SeqLMWithValueHead
    assert set(HEAD_KEYS) <= reloaded.state_dict().keys()
    assert_same_weights(model, reloaded)
    inputs = model_inputs("t5")
    with torch.no_grad():
        expected, actual = model(**inputs), reloaded(**inputs)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.value, expected.value)


def test_resave_into_the_directory_it_was_loaded_from_writes_the_new_weights(tmp_path):
    out = tmp_path / "out"
    wrap("llama", tmp_path).save_pretrained(out)
    model = perturbed(AutoModelForCausalLM.from_pretrained(out))  # its tensors are memory-mapped from `out`

    model.save_pretrained(out)

    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


# --- sharding --------------------------------------------------------------------------------------------------------


def test_small_max_shard_size_writes_numbered_shards_and_index(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"

    model.save_pretrained(out, max_shard_size="20KB")

    shards = shard_names(out)
    assert len(shards) > 1
    totals = {SHARD_NAME.fullmatch(name).group(2) for name in shards}
    assert totals == {f"{len(shards):05d}"}
    assert {SHARD_NAME.fullmatch(name).group(1) for name in shards} == {f"{k:05d}" for k in range(1, len(shards) + 1)}
    assert names(out) == shards | {"model.safetensors.index.json", "config.json", "generation_config.json", "README.md"}
    weight_map = read_index(out)
    assert set(weight_map.values()) == shards
    assert set(weight_map) == set(model.state_dict())
    assert weight_map["v_head.summary.weight"] in shards
    assert weight_map["v_head.summary.bias"] in shards


def test_sharded_save_reloads_bit_exact_and_names_the_head_shard(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="20KB")

    reloaded = AutoModelForCausalLM.from_pretrained(out)

    assert_same_weights(model, reloaded)
    source = reloaded.v_head_source
    assert isinstance(source, transformers_vhead.HeadSource)
    assert source.is_loaded
    assert Path(source.file) == out / read_index(out)["v_head.summary.weight"]


def test_unsharded_resave_removes_old_shards_and_index(tmp_path):
    out = tmp_path / "out"
    wrap("llama", tmp_path).save_pretrained(out, max_shard_size="20KB")
    assert len(shard_names(out)) > 1
    (out / "notes.txt").write_text("my notes")
    model = perturbed(wrap("llama", tmp_path, seed=1))

    model.save_pretrained(out)

    assert names(out) == {"model.safetensors", "config.json", "generation_config.json", "README.md", "notes.txt"}
    assert (out / "notes.txt").read_text() == "my notes"
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


def test_resave_with_fewer_shards_removes_shards_not_rewritten(tmp_path):
    out = tmp_path / "out"
    wrap("llama", tmp_path).save_pretrained(out, max_shard_size="20KB")
    old_shards = shard_names(out)
    model = perturbed(wrap("llama", tmp_path, seed=1))

    model.save_pretrained(out, max_shard_size="60KB")

    new_shards = shard_names(out)
    assert 1 < len(new_shards) < len(old_shards)
    assert new_shards == set(read_index(out).values())
    assert all(name.endswith(f"-of-{len(new_shards):05d}.safetensors") for name in new_shards)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


def test_resave_keeps_unrelated_user_files(tmp_path):
    out = tmp_path / "out"
    wrap("llama", tmp_path).save_pretrained(out, max_shard_size="20KB")
    user_files = {
        "notes.txt": b"remember the learning rate\n",
        "tokenizer.json": b'{"version": "1.0"}',
        "training_args.json": b"{}",
        "logs/events.txt": b"step 1\n",
    }
    for name, content in user_files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(content)

    wrap("llama", tmp_path, seed=1).save_pretrained(out)
    wrap("llama", tmp_path, seed=2).save_pretrained(out, max_shard_size="40KB")

    assert {name: (out / name).read_bytes() for name in user_files} == user_files
    assert not [name for name in names(out) if name.startswith(STAGING_PREFIX)]


# --- failed saves ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous_shard_size", [None, "20KB"], ids=["previous-unsharded", "previous-sharded"])
def test_save_failing_on_second_shard_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch, previous_shard_size):
    original = wrap("llama", tmp_path)
    out = tmp_path / "out"
    original.save_pretrained(out, **({"max_shard_size": previous_shard_size} if previous_shard_size else {}))
    (out / "tokenizer.json").write_text("{}")
    before = snapshot(out)
    changed = perturbed(wrap("llama", tmp_path, seed=1))  # before the patch: wrap saves a base model
    before_beside = names(tmp_path)

    real_save_file = modeling_utils.safe_save_file
    written: list[Path] = []

    def fail_on_second_shard(tensors, filename, metadata=None):
        if written:
            Path(filename).write_bytes(b"half a shard")  # a partial write, then the disk fills up
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)
        written.append(Path(filename))

    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_on_second_shard)
    failure = r"failed while writing model-00002-of-\d{5}\.safetensors: No space left on device \(the disk is full\)"
    with pytest.raises(CheckpointSaveError, match=failure) as info:
        changed.save_pretrained(out, max_shard_size="30KB")
    monkeypatch.undo()

    assert isinstance(info.value.__cause__, OSError) and info.value.errno == 28
    assert f"The checkpoint already in {out} is untouched" in str(info.value)
    assert len(written) == 1 and written[0].name == "model-00001-of-00004.safetensors"
    assert written[0].parent.parent == out.parent and written[0].parent != out  # into the staging folder beside
    assert snapshot(out) == before  # same names (no new file, no staging folder) and the same bytes
    assert names(tmp_path) == before_beside  # no staging folder beside it either
    assert_same_weights(original, AutoModelForCausalLM.from_pretrained(out))


def test_save_failing_while_writing_config_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch):
    original = wrap("llama", tmp_path)
    out = tmp_path / "out"
    original.save_pretrained(out)
    before, before_beside = snapshot(out), names(tmp_path)
    changed = perturbed(wrap("llama", tmp_path, seed=1))

    def truncated_json(self, json_file_path, use_diff=True):
        text = self.to_json_string(use_diff=use_diff)
        Path(json_file_path).write_text(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(changed.config), "to_json_file", truncated_json)
    with pytest.raises(CheckpointSaveError, match="failed while writing config.json: No space left on device"):
        changed.save_pretrained(out, max_shard_size="20KB")
    monkeypatch.undo()

    assert snapshot(out) == before
    assert names(tmp_path) == before_beside
    assert_same_weights(original, AutoModelForCausalLM.from_pretrained(out))


def test_failed_first_save_leaves_no_directory_behind(tmp_path, monkeypatch):
    model = wrap("llama", tmp_path)
    out = tmp_path / "new" / "out"

    def failing_json(self, json_file_path, use_diff=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model.config), "to_json_file", failing_json)
    failure = rf"while writing config\.json: No space left on device.*Nothing is left at {re.escape(str(out))}"
    with pytest.raises(CheckpointSaveError, match=failure):
        model.save_pretrained(out)

    assert not out.exists() and not out.parent.exists()  # nor the parent the save made for it
    assert names(tmp_path) == {"llama-base"}  # no staging folder beside it


# --- the model card --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "pipeline_tag", "auto_class"),
    [("llama", "text-generation", "AutoModelForCausalLM"), ("t5", "text2text-generation", "AutoModelForSeq2SeqLM")],
)
def test_model_card_metadata_of_model_wrapped_from_local_dir(tmp_path, family, pipeline_tag, auto_class):
    out = tmp_path / "out"
    wrap(family, tmp_path).save_pretrained(out)

    card = ModelCard.load(out / "README.md")

    assert card.data.library_name == "transformers"
    assert {"transformers-vhead", "value-head", family} <= set(card.data.tags)
    assert card.data.pipeline_tag == pipeline_tag
    assert card.data.base_model is None
    assert "base_model" not in card.data.to_dict()
    snippet = usage_snippet(out / "README.md")
    assert "import transformers_vhead" in snippet
    assert f'{auto_class}.from_pretrained("{out}")' in snippet


def test_model_card_declares_hub_base_model(tmp_path, llama_dir):
    cache_dir = tmp_path / "hub-cache"
    populate_hub_cache(cache_dir, "acme/tiny-llama", llama_dir)
    model = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained("acme/tiny-llama", cache_dir=cache_dir)
    out, resaved = tmp_path / "out", tmp_path / "resaved"

    model.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(resaved)  # the base model is kept in the config

    for directory in (out, resaved):
        card = ModelCard.load(directory / "README.md")
        assert card.data.base_model == "acme/tiny-llama"
        assert "https://huggingface.co/acme/tiny-llama" in card.text
        assert card.data.library_name == "transformers"
        assert card.data.pipeline_tag == "text-generation"


def test_existing_readme_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    readme = b"---\nlicense: mit\n---\n\n# My critic\n\nHand-written notes.\n"
    (out / "README.md").write_bytes(readme)

    wrap("llama", tmp_path).save_pretrained(out)
    wrap("llama", tmp_path, seed=1).save_pretrained(out, max_shard_size="20KB")

    assert (out / "README.md").read_bytes() == readme
    assert (out / "model.safetensors.index.json").is_file()


def card_row(text: str, setting: str) -> str:
    [value] = re.findall(rf"^\| {setting} \| (.*) \|$", text, re.MULTILINE)
    return value


def test_card_says_where_the_head_came_from_and_the_reward_normalisation(tmp_path, llama_dir):
    fresh = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    fresh.save_pretrained(tmp_path / "critic")
    card = ModelCard.load(tmp_path / "critic" / "README.md")
    origin = "a fresh head (PyTorch's default nn.Linear init) when the value head was added"
    assert card_row(card.text, "origin") == origin
    assert "Reward normalisation" not in card.text

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "critic", score_mean=0.5, score_std=2.0)
    loaded.save_pretrained(tmp_path / "again")
    card = ModelCard.load(tmp_path / "again" / "README.md")
    origin = "loaded from `model.safetensors` of `critic` (transformers-vhead layout)"  # no local directories
    assert card_row(card.text, "origin") == origin
    assert str(tmp_path) not in card_row(card.text, "origin")
    assert "returns `(score - 0.5) / 2.0`" in card.text


def test_card_of_a_peft_policy_says_it_is_an_adapter_with_its_head(tmp_path, llama_dir):
    model = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    model.save_pretrained(tmp_path / "policy")
    card = ModelCard.load(tmp_path / "policy" / "README.md")
    assert "PEFT adapter (LORA, r=4)" in card.text and "`value_head.safetensors`" in card.text
    assert {"transformers-vhead", "value-head", "peft"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"  # our classes load it, not peft's
    assert card.data.base_model is None  # the adapter's base is a local directory


def test_card_of_a_peft_policy_declares_the_adapters_hub_base_model(tmp_path, llama_dir):
    cache_dir = tmp_path / "hub-cache"
    populate_hub_cache(cache_dir, "acme/tiny-llama", llama_dir)
    model = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(
        "acme/tiny-llama", cache_dir=cache_dir, peft_config=policy_lora()
    )
    model.save_pretrained(tmp_path / "policy")

    card = ModelCard.load(tmp_path / "policy" / "README.md")
    assert card.data.base_model == "acme/tiny-llama"
    assert json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "acme/tiny-llama"
    )


def test_card_usage_snippet_of_a_peft_policy_loads_base_adapter_and_head(tmp_path, monkeypatch, tokenizer, llama_dir):
    policy = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    out = (tmp_path / "policy").absolute()
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    snippet = usage_snippet(out / "README.md")
    # transformers' auto classes load a hub adapter repo as the base model plus the adapter, without the head
    assert f'AutoModelForCausalLMWithValueHead.from_pretrained("{out}")' in snippet
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), namespace)

    model = namespace["model"]
    assert model.is_peft_model and model.v_head_source.is_loaded
    assert torch.equal(model.v_head.summary.weight, policy.v_head.summary.weight)


def test_an_existing_card_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# My critic\n")
    wrap("llama", tmp_path).save_pretrained(out, overwrite_model_card=True)
    card = ModelCard.load(out / "README.md")
    assert "value-head" in card.data.tags and "My critic" not in card.text


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_card_usage_snippet_runs_from_another_directory(tmp_path, monkeypatch, capsys, tokenizer, family):
    out = (tmp_path / "out").absolute()
    wrap(family, tmp_path).save_pretrained(out)
    tokenizer.save_pretrained(out)
    snippet = usage_snippet(out / "README.md")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()  # what the save printed (DeepSpeed's first import prints its accelerator) is not the snippet's

    namespace: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), namespace)

    assert type(namespace["model"]) is value_head_class(family)
    seq = namespace["inputs"]["input_ids"].shape[1]
    outputs = namespace["outputs"]
    assert tuple(outputs.logits.shape) == (1, seq, VOCAB_SIZE)
    assert tuple(outputs.value.shape) == (1, seq)
    assert capsys.readouterr().out.strip() == f"torch.Size([1, {seq}, {VOCAB_SIZE}]) torch.Size([1, {seq}])"


# --- re-saves into a directory that already holds a checkpoint -------------------------------------------------------


def test_variant_save_keeps_the_default_sharded_checkpoint(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="20KB")
    default_files = {name: (out / name).read_bytes() for name in shard_names(out) | {"model.safetensors.index.json"}}

    model.save_pretrained(out, variant="fp16", max_shard_size="40KB")

    assert {name: (out / name).read_bytes() for name in default_files if (out / name).exists()} == default_files
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))


def test_non_main_process_save_leaves_the_checkpoint_untouched(tmp_path):
    model = wrap("llama", tmp_path)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="20KB")
    before = snapshot(out)

    model.save_pretrained(out, max_shard_size="20KB", is_main_process=False)

    assert snapshot(out) == before


def test_sharded_resave_over_unsharded_checkpoint_reloads_the_new_weights(tmp_path):
    out = tmp_path / "out"
    wrap("llama", tmp_path).save_pretrained(out)
    model = perturbed(wrap("llama", tmp_path, seed=1))

    model.save_pretrained(out, max_shard_size="20KB")

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert Path(reloaded.v_head_source.file).name == read_index(out)["v_head.summary.weight"]
    assert_same_weights(model, reloaded)
    assert "model.safetensors" not in names(out)


def test_model_card_has_no_base_model_for_relative_local_dir_after_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_bare("llama").save_pretrained("models/llama")
    model = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained("models/llama")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    model.save_pretrained(tmp_path / "out")

    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model is None


def test_a_whole_model_save_over_a_peft_policy_drops_the_adapter_files_and_back(tmp_path, llama_dir):
    """A directory holding `adapter_config.json` loads as that adapter: a whole-model save over a PEFT policy's
    directory must not leave it there (the reload would be the old policy), nor a PEFT save a whole model's weights."""
    policy = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    policy.save_pretrained(tmp_path)
    whole = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    whole.save_pretrained(tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert not any(name.startswith(("adapter_", "value_head")) for name in names), names
    reloaded = transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert not reloaded.is_peft_model
    assert torch.equal(reloaded.v_head.summary.weight, whole.v_head.summary.weight)

    policy.save_pretrained(tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert "model.safetensors" not in names and "adapter_config.json" in names, names
    assert transformers_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).is_peft_model
