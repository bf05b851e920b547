"""One load looks up each file of a source once and reads each config once.

Every look-up of transformers and of ours goes through `transformers.utils.hub.cached_files` (for a hub id, each one is
a request to the hub when online), and peft is handed local folders, so it never asks the hub
(`huggingface_hub.hf_hub_download` as peft imports it). The spies below count those calls and the opens of every
`config.json` and `adapter_config.json`, and call the real functions: the loads are real, from directories and from a
real offline hub cache. A hub id is loaded from its snapshot folder, and must give the model a local load gives.
"""

import builtins
import os
from collections import Counter
from pathlib import Path

import peft.config
import peft.utils.save_and_load
import pytest
import torch
import transformers.utils.hub
from conftest import build_bare, model_inputs, policy_lora, populate_hub_cache, save_reward_adapter
from test_loading import save_trl_pickle_layout, trl_head
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead

CONFIG_NAMES = ("config.json", "adapter_config.json")


class Lookups:
    """What one load looked up (`cached_files`, by source and file name), asked peft's hub for, and opened."""

    def __init__(self, monkeypatch):
        self.resolved: Counter = Counter()
        self.opened: Counter = Counter()
        self.peft_hub: Counter = Counter()
        real_cached_files, real_open = transformers.utils.hub.cached_files, builtins.open

        def cached_files(path_or_repo_id, filenames, *args, **kwargs):
            subfolder = kwargs.get("subfolder") or ""
            for name in filenames:
                self.resolved[(_short(path_or_repo_id), os.path.join(subfolder, name))] += 1
            return real_cached_files(path_or_repo_id, filenames, *args, **kwargs)

        def opened(file, *args, **kwargs):
            if os.path.basename(str(file)) in CONFIG_NAMES:
                self.opened[os.path.realpath(file)] += 1
            return real_open(file, *args, **kwargs)

        def peft_hub_download(repo_id, filename, *args, **kwargs):
            self.peft_hub[(repo_id, filename)] += 1
            raise AssertionError(f"peft looked up {filename} of {repo_id} on the hub")

        monkeypatch.setattr(transformers.utils.hub, "cached_files", cached_files)
        monkeypatch.setattr(builtins, "open", opened)
        for module in (peft.config, peft.utils.save_and_load):
            monkeypatch.setattr(module, "hf_hub_download", peft_hub_download)

    def clear(self):
        self.resolved.clear()
        self.opened.clear()

    def assert_each_once(self, allowed: dict | None = None):
        """No file looked up nor config opened twice, except the `allowed` counts (a file name: how many times)."""
        allowed = allowed or {}
        for (source, name), count in self.resolved.items():
            assert count <= allowed.get(name, 1), f"{name} of {source} was looked up {count} times: {self.resolved}"
        for path, count in self.opened.items():
            limit = allowed.get(f"open {os.path.basename(path)}", 1)
            assert count <= limit, f"{path} was read {count} times: {self.opened}"

    def files_of(self, source: str) -> set[str]:
        return {name for (where, name) in self.resolved if where == source}


def _short(path_or_repo_id) -> str:
    """A hub id as it is; a local folder by its own name (the snapshot folder of the hub cache by its commit)."""
    text = str(path_or_repo_id)
    return text if not os.path.isdir(text) else Path(text).name


@pytest.fixture
def lookups(monkeypatch):
    return Lookups(monkeypatch)


@pytest.fixture
def sources(tmp_path):
    """Checkpoints of one tiny Llama in several layouts, as directories and in an offline hub cache."""
    torch.manual_seed(0)
    bare = build_bare("llama")
    bare.save_pretrained(tmp_path / "base")
    ours = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "base", v_head_init_strategy="normal")
    ours.save_pretrained(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "trl-bin").mkdir()
    save_trl_pickle_layout(tmp_path / "trl-bin", trl_head(), shards=3)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "base", peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "policy")
    save_reward_adapter(tmp_path / "base", tmp_path / "reward")
    cache = tmp_path / "hub"
    for name, commit in (("base", "b"), ("ours", "0"), ("sharded", "5")):
        populate_hub_cache(cache, f"org/{name}", tmp_path / name, commit=commit * 40)
    # a policy adapter on the hub whose base model is on the hub too
    AutoModelForCausalLMWithValueHead.from_pretrained(
        "org/base", cache_dir=cache, peft_config=policy_lora()
    ).save_pretrained(tmp_path / "hub-policy")
    populate_hub_cache(cache, "org/policy", tmp_path / "hub-policy", commit="c" * 40)
    return tmp_path, cache


@pytest.mark.parametrize("name", ["base", "ours", "sharded", "trl-bin"])
def test_a_directory_load_looks_up_each_file_once(sources, lookups, name):
    root, _ = sources
    model = AutoModelForCausalLMWithValueHead.from_pretrained(root / name)
    if name == "trl-bin":
        # TRL's pickle layout has no generation_config.json: transformers then builds the generation config from
        # config.json itself (it keeps generation settings a config object drops), as a bare model's load does
        assert (root / name / "generation_config.json").exists() is False
        lookups.assert_each_once({"open config.json": 2})
    else:
        lookups.assert_each_once()
    assert "config.json" in lookups.files_of(name)
    weights = {"base": "model.safetensors", "ours": "model.safetensors", "sharded": "model.safetensors.index.json"}
    assert weights.get(name, "pytorch_model.bin.index.json") in lookups.files_of(name)
    assert model.v_head_source.is_loaded == (name != "base")


@pytest.mark.parametrize("name", ["ours", "sharded"])
def test_a_hub_load_looks_up_each_file_once_and_loads_from_the_snapshot(sources, lookups, name):
    root, cache = sources
    model = AutoModelForCausalLMWithValueHead.from_pretrained(f"org/{name}", cache_dir=cache)
    lookups.assert_each_once()
    looked_up = lookups.files_of(f"org/{name}")
    assert {"config.json", "adapter_config.json", "generation_config.json"} <= looked_up
    assert set(lookups.resolved) == {(f"org/{name}", file) for file in looked_up}  # transformers looked up nothing
    assert model.name_or_path == model.config.name_or_path == f"org/{name}"

    local = AutoModelForCausalLMWithValueHead.from_pretrained(root / name)
    inputs = model_inputs("llama")
    assert torch.equal(model(**inputs).logits, local(**inputs).logits)
    assert torch.equal(model.compute_values(**inputs), local.compute_values(**inputs))
    assert str(model.v_head_source.file).startswith(str(cache))


def test_an_adapter_load_with_a_reward_adapter_looks_up_and_reads_each_file_once(sources, lookups):
    root, _ = sources
    model = AutoModelForCausalLMWithValueHead.from_pretrained(root / "policy", reward_adapter=root / "reward")
    lookups.assert_each_once()
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= lookups.files_of("policy")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= lookups.files_of("reward")
    assert "model.safetensors" in lookups.files_of("base")
    for adapter in ("policy", "reward"):
        assert lookups.opened[os.path.realpath(root / adapter / "adapter_config.json")] == 1
    assert model.v_head_source.file == str(root / "policy" / "value_head.safetensors")
    assert model.rm_adapter_name == "reward_adapter"


def test_a_hub_adapter_on_a_hub_base_looks_up_each_file_once(sources, lookups):
    root, cache = sources
    model = AutoModelForCausalLMWithValueHead.from_pretrained("org/policy", cache_dir=cache)
    lookups.assert_each_once()
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= lookups.files_of(
        "org/policy"
    )
    assert {"config.json", "model.safetensors"} <= lookups.files_of("org/base")
    assert model.is_peft_model and model.name_or_path == "org/base"
    assert not lookups.peft_hub


def test_the_auto_classes_add_only_their_own_look_up_of_the_adapter_config(sources, lookups):
    """transformers' auto factory looks for `adapter_config.json` and reads `config.json` before our
    `from_pretrained` runs; the load then reads neither config again and looks up every other file once."""
    root, cache = sources
    AutoModelForCausalLM.from_pretrained("org/ours", cache_dir=cache)
    lookups.assert_each_once({"adapter_config.json": 2})
    assert lookups.resolved[("org/ours", "config.json")] == 1
    lookups.clear()
    AutoModelForCausalLM.from_pretrained(root / "policy")
    lookups.assert_each_once({"open adapter_config.json": 2})
    assert lookups.opened[os.path.realpath(root / "policy" / "config.json")] == 1


def test_load_adapter_on_a_peft_model_reads_the_adapter_config_once(sources, lookups):
    root, _ = sources
    model = AutoModelForCausalLMWithValueHead.from_pretrained(root / "policy")
    lookups.clear()
    model.load_adapter(root / "policy", adapter_name="second")
    lookups.assert_each_once()
    assert lookups.opened[os.path.realpath(root / "policy" / "adapter_config.json")] == 1
    assert set(model.pretrained_model.peft_config) == {"default", "second"}
    assert model.active_adapters() == ["default"]
    second = [p for n, p in model.pretrained_model.named_parameters() if ".second." in n]
    assert second and not any(p.requires_grad for p in second)


def test_a_checkpoint_in_a_subfolder_loads_from_a_directory_and_by_hub_id(sources, lookups, tmp_path):
    root, _ = sources
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("a repo holding its checkpoint in a subfolder\n")
    AutoModelForCausalLMWithValueHead.from_pretrained(root / "ours").save_pretrained(repo / "critic")
    cache = tmp_path / "subfolder-hub"
    populate_hub_cache(cache, "org/repo", repo, commit="d" * 40)
    local = AutoModelForCausalLMWithValueHead.from_pretrained(root / "ours")
    inputs = model_inputs("llama")
    lookups.clear()
    snapshot = cache / "models--org--repo" / "snapshots" / ("d" * 40)
    for source, hub_kwargs, folder in ((repo, {}, repo), ("org/repo", {"cache_dir": cache}, snapshot)):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(source, subfolder="critic", **hub_kwargs)
        lookups.assert_each_once()
        assert torch.equal(model.compute_values(**inputs), local.compute_values(**inputs))
        assert model.v_head_source.file == str(folder / "critic" / "model.safetensors")
        assert model.name_or_path == str(source)
    assert ("org/repo", "critic/config.json") in lookups.resolved
