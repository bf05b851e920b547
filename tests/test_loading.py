"""Every checkpoint layout loads, and the model says where its value head came from.

TRL (non-PEFT) wrote its head into the base model's own checkpoint: `pretrained_model.save_pretrained(d,
state_dict={**base_state_dict, "v_head.summary.weight": ..., "v_head.summary.bias": ...})`. `save_trl_layout` below is
that same writer; the TRL tests in test_architectures.py also load checkpoints written by TRL 1.12 itself.
"""

import json
import logging

import pytest
import torch
from conftest import build_bare, model_inputs, populate_hub_cache
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead

HIDDEN = 32


def trl_head(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "v_head.summary.weight": torch.randn(1, HIDDEN, generator=generator),
        "v_head.summary.bias": torch.randn(1, generator=generator),
    }


def save_trl_layout(path, head: dict[str, torch.Tensor], **save_kwargs):
    """A TRL checkpoint: the base model's keys (no `pretrained_model.` prefix) plus `v_head.*`, base config.json."""
    bare = build_bare("llama")
    bare.save_pretrained(path, state_dict={**bare.state_dict(), **head}, **save_kwargs)
    return bare


def save_trl_pickle_layout(path, head: dict[str, torch.Tensor], shards: int = 1):
    """TRL's older layout: `pytorch_model.bin` (or its shards and index) holding the base keys plus `v_head.*`."""
    bare = build_bare("llama")
    bare.config.save_pretrained(path)
    state_dict = {**{k: v.clone() for k, v in bare.state_dict().items()}, **head}
    if shards == 1:
        torch.save(state_dict, path / "pytorch_model.bin")
        return bare
    keys = list(state_dict)
    weight_map = {}
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = {key: state_dict[key] for key in keys[index::shards]}
        torch.save(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return bare


def assert_loaded_exactly(model, bare, head):
    assert torch.equal(model.v_head.summary.weight, head["v_head.summary.weight"])
    assert torch.equal(model.v_head.summary.bias, head["v_head.summary.bias"])
    for name, tensor in bare.state_dict().items():
        assert torch.equal(model.pretrained_model.state_dict()[name], tensor), name
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model.v_head.summary(bare.model(**inputs).last_hidden_state).squeeze(-1)
        torch.testing.assert_close(model(**inputs).value, expected, atol=1e-6, rtol=0)


TRL_LAYOUTS = {
    "merged into model.safetensors": lambda path, head: save_trl_layout(path, head),
    "in one shard of a sharded safetensors checkpoint": lambda path, head: save_trl_layout(
        path, head, max_shard_size="20KB"
    ),
    "merged into pytorch_model.bin": lambda path, head: save_trl_pickle_layout(path, head),
    "in one shard of a sharded pytorch_model.bin": lambda path, head: save_trl_pickle_layout(path, head, shards=3),
}


def head_file(path) -> str:
    """The file of a checkpoint that holds `v_head.summary.weight`, read from its index when it is sharded."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            assert len(set(weight_map.values())) > 2  # really sharded
            return str(path / weight_map["v_head.summary.weight"])
    return str(next(path.glob("model.safetensors"), path / "pytorch_model.bin"))


@pytest.mark.parametrize("layout", TRL_LAYOUTS)
def test_trl_checkpoint_loads_exactly_and_names_its_head_file(tmp_path, layout):
    head = trl_head()
    bare = TRL_LAYOUTS[layout](tmp_path, head)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)

    assert_loaded_exactly(model, bare, head)
    assert model.v_head_source.file == head_file(tmp_path)


def test_trl_itself_cannot_reload_a_local_sharded_checkpoint_but_we_can(tmp_path, trl_ppo):
    head = trl_head()
    bare = save_trl_layout(tmp_path, head, max_shard_size="20KB")

    with pytest.raises(Exception):  # noqa: B017  TRL 1.12 calls hf_hub_download on the local path (TRL #1917)
        trl_ppo.AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert_loaded_exactly(AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path), bare, head)


def test_trl_sharded_checkpoint_loads_from_the_offline_hub_cache(tmp_path):
    head = trl_head()
    bare = save_trl_layout(tmp_path / "src", head, max_shard_size="20KB")
    snapshot = populate_hub_cache(tmp_path / "cache", "acme/trl-critic", tmp_path / "src")

    model = AutoModelForCausalLMWithValueHead.from_pretrained("acme/trl-critic", cache_dir=tmp_path / "cache")

    assert_loaded_exactly(model, bare, head)
    assert model.v_head_source.file.startswith(str(snapshot))


def test_native_repo_loads_by_hub_id_through_auto_model_for_causal_lm(tmp_path):
    original = AutoModelForCausalLMWithValueHead.from_pretrained(build_bare("llama"), v_head_init_strategy="normal")
    original.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    commit = "b" * 40
    populate_hub_cache(tmp_path / "cache", "acme/vh-tiny", tmp_path / "src", commit=commit)

    by_id = AutoModelForCausalLM.from_pretrained("acme/vh-tiny", cache_dir=tmp_path / "cache")
    by_revision = AutoModelForCausalLM.from_pretrained(
        "acme/vh-tiny", cache_dir=tmp_path / "cache", revision=commit, local_files_only=True
    )

    for model in (by_id, by_revision):
        assert type(model) is AutoModelForCausalLMWithValueHead and model.v_head_source.is_loaded
        assert torch.equal(model.v_head.summary.weight, original.v_head.summary.weight)


def test_plain_lm_gets_a_fresh_head_and_says_so_once(llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="transformers_vhead"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, v_head_init_strategy="normal")

    messages = [record for record in caplog.records if "Value head" in record.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.WARNING
    assert "freshly initialised with normal(std=0.2)" in messages[0].getMessage()
    assert not model.v_head_source.is_loaded and model.v_head_source.init == "normal(std=0.2)"
    assert torch.equal(model.v_head.summary.bias, torch.zeros(1))
    bare = LlamaForCausalLM.from_pretrained(llama_dir)
    assert all(torch.equal(model.pretrained_model.state_dict()[k], v) for k, v in bare.state_dict().items())


def test_loaded_head_is_reported_at_info_level_with_its_file(tmp_path, caplog):
    save_trl_layout(tmp_path, trl_head())
    with caplog.at_level(logging.INFO, logger="transformers_vhead"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)

    messages = [record for record in caplog.records if "Value head" in record.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.INFO
    assert f"loaded from {tmp_path / 'model.safetensors'}" in messages[0].getMessage()


def test_loading_keywords_pass_through_to_transformers(llama_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        llama_dir, dtype=torch.bfloat16, device_map="auto", attn_implementation="eager", local_files_only=True
    )

    assert model.pretrained_model.dtype == torch.bfloat16
    assert model.v_head.summary.weight.dtype == torch.float32
    assert model.pretrained_model.config._attn_implementation == "eager"
    assert model.device.type == "cpu" and model.v_head.summary.weight.device.type == "cpu"
    with torch.no_grad():
        assert model(**model_inputs("llama")).value.dtype == torch.float32


def test_output_loading_info_returns_the_model_and_a_clean_report(tmp_path):
    save_trl_layout(tmp_path, trl_head())

    model, info = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, output_loading_info=True)

    assert model.v_head_source.is_loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
