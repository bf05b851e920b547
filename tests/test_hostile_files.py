"""A pickle that would run code is refused on every path a load reads one, by our own pre-read (so the error is ours,
never transformers' or peft's), and nothing of it runs: the sentinel file its unpickling would create never appears.

Each hostile file holds a real tensor next to an object whose `__reduce__` calls `os.system("touch SENTINEL")` (or
`pathlib.Path.touch`), written as torch.save's zip format, its legacy format, and raw `pickle.dump`s (protocol 2, whose
globals are GLOBAL opcodes, and protocol 4, whose are STACK_GLOBAL).
"""

import json
import os
import pathlib
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import build_bare, policy_lora, save_reward_adapter
from test_loading import save_trl_pickle_layout, trl_head
from transformers import AutoModelForCausalLM

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.adapters import load_adapter, require_adapter
from transformers_vhead.errors import CorruptCheckpointError, UnsafePickleError
from transformers_vhead.safe_reading import load_pickle_state_dict
from transformers_vhead.sources import SourceFiles
from transformers_vhead_cli import main

HIDDEN = 32  # the tiny Llama's hidden size
HEAD_KEY = "v_head.summary.weight"


class _Shell:
    """Unpickled, runs `touch <path>` in a shell."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Touch:
    """Unpickled, creates `path` through `pathlib.Path.touch` (no shell)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _payload(sentinel: Path, payload: type) -> dict:
    return {
        "v_head.summary.weight": torch.zeros(1, HIDDEN),
        "v_head.summary.bias": torch.zeros(1),
        "x": payload(sentinel),
    }


def _zip(path: Path, sentinel: Path) -> None:
    torch.save(_payload(sentinel, _Shell), path)


def _legacy(path: Path, sentinel: Path) -> None:
    torch.save(_payload(sentinel, _Touch), path, _use_new_zipfile_serialization=False)


def _raw_protocol_2(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps(_payload(sentinel, _Shell), protocol=2))


def _raw_protocol_4(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps(_payload(sentinel, _Touch), protocol=4))


WRITERS = [_zip, _legacy, _raw_protocol_2, _raw_protocol_4]
WRITER_IDS = ["torch.save-zip", "torch.save-legacy", "pickle-protocol-2", "pickle-protocol-4"]


@pytest.fixture
def sentinel(tmp_path) -> Path:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "the hostile pickle ran"


def _refused(victim: Path):
    """`pytest.raises` for our refusal of `victim`, checked to say what to do."""
    return pytest.raises(UnsafePickleError, match=rf"Refused to read {re.escape(str(victim))} .*would call or build")


def _check_advice(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "Nothing of it was unpickled" in message and "safetensors" in message and "weights_only=False" in message
    assert "\n" not in message


# --- the model's own weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", WRITERS, ids=WRITER_IDS)
def test_a_hostile_pytorch_model_bin_is_refused_by_both_entry_points(tmp_path, sentinel, write):
    AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    victim = tmp_path / "model" / "pytorch_model.bin"
    write(victim, sentinel)

    with _refused(victim) as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "model")
    _check_advice(error)
    with _refused(victim):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the auto class, after `import transformers_vhead`
    assert ("posix.system" if write in (_zip, _raw_protocol_2) else "pathlib") in str(error.value)  # what it calls


@pytest.mark.parametrize("write", [_zip, _raw_protocol_4], ids=["torch.save-zip", "pickle-protocol-4"])
def test_a_hostile_pickle_shard_is_refused_even_when_the_head_is_in_another(tmp_path, sentinel, write):
    save_trl_pickle_layout(tmp_path, trl_head(), shards=3)  # pytorch_model-0000{1,2,3}-of-00003.bin and the index
    weight_map = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())["weight_map"]
    victim = tmp_path / next(shard for shard in sorted(set(weight_map.values())) if shard != weight_map[HEAD_KEY])
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, use_safetensors=False)


@pytest.mark.parametrize("write", WRITERS, ids=WRITER_IDS)
def test_a_hostile_value_head_bin_beside_a_model_is_refused(llama_dir, sentinel, write):
    victim = llama_dir / "value_head.bin"  # LLaMA-Factory's layout
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)


def test_a_hostile_file_named_by_the_configs_transformers_weights_is_refused(tmp_path, sentinel):
    """transformers loads the file a config's `transformers_weights` names (`adapter_model.bin` is allowed there)."""
    AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    victim = tmp_path / "model" / "adapter_model.bin"
    _zip(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "model")


# --- adapters ----------------------------------------------------------------------------------------------------


@pytest.fixture
def policy_dir(llama_dir, tmp_path) -> Path:
    """A PEFT policy saved by this package (adapter_config.json, adapter_model.safetensors, value_head.safetensors)."""
    path = tmp_path / "policy"
    AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora()).save_pretrained(path)
    return path


@pytest.mark.parametrize("write", [_zip, _legacy, _raw_protocol_4], ids=["torch.save-zip", "torch.save-legacy", "p4"])
def test_a_hostile_trl_peft_head_file_is_refused(policy_dir, sentinel, write):
    """TRL's PEFT layout: the adapter, and a `pytorch_model.bin` holding only `v_head.*`."""
    (policy_dir / "value_head.safetensors").unlink()
    victim = policy_dir / "pytorch_model.bin"
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)


@pytest.mark.parametrize("write", [_zip, _raw_protocol_2], ids=["torch.save-zip", "pickle-protocol-2"])
def test_a_hostile_value_head_bin_beside_an_adapter_is_refused(policy_dir, sentinel, write):
    (policy_dir / "value_head.safetensors").unlink()
    victim = policy_dir / "value_head.bin"
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)


@pytest.mark.parametrize("write", WRITERS, ids=WRITER_IDS)
def test_a_hostile_adapter_model_bin_is_refused_before_peft_reads_it(llama_dir, policy_dir, sentinel, write):
    (policy_dir / "adapter_model.safetensors").unlink()
    victim = policy_dir / "adapter_model.bin"
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    with _refused(victim):
        AutoModelForCausalLM.from_pretrained(policy_dir)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir)
    with _refused(victim):
        model.load_adapter(policy_dir)  # transformers' adapter API on the value-head model
    with _refused(victim):
        load_adapter(build_bare("llama"), require_adapter(SourceFiles(policy_dir, {})))
    assert not model.is_peft_model


@pytest.mark.parametrize("write", [_zip, _legacy, _raw_protocol_4], ids=["torch.save-zip", "torch.save-legacy", "p4"])
def test_a_hostile_reward_adapter_bin_is_refused_and_the_policy_is_untouched(llama_dir, tmp_path, sentinel, write):
    reward_dir = save_reward_adapter(llama_dir, tmp_path / "reward")
    (reward_dir / "adapter_model.safetensors").unlink()
    victim = reward_dir / "adapter_model.bin"
    write(victim, sentinel)

    with _refused(victim):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            llama_dir, peft_config=policy_lora(), reward_adapter=reward_dir
        )
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, peft_config=policy_lora())
    with _refused(victim):
        policy._attach_reward_adapter(reward_dir, "reward_adapter", {})
    assert list(policy.pretrained_model.peft_config) == ["default"] and not policy.supports_rm_adapter


# --- the command line --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "adapter"])
def test_inspect_of_a_hostile_pickle_is_one_error_line(tmp_path, policy_dir, sentinel, capsys, where):
    if where == "model":
        AutoModelForCausalLMWithValueHead(build_bare("llama")).save_pretrained(tmp_path / "model")
        (tmp_path / "model" / "model.safetensors").unlink()
        source, victim = tmp_path / "model", tmp_path / "model" / "pytorch_model.bin"
    else:
        (policy_dir / "adapter_model.safetensors").unlink()
        source, victim = policy_dir, policy_dir / "adapter_model.bin"
    _raw_protocol_4(victim, sentinel)
    capsys.readouterr()  # what the fixtures printed (progress bars)

    assert main(["inspect", str(source)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"transformers-vhead: error: Refused to read {victim} ")
    assert "safetensors" in lines[0]


# --- telling a hostile pickle from a corrupt one -----------------------------------------------------------------


def test_a_corrupt_pickle_is_corrupt_not_unsafe(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"weight": torch.arange(6.0).reshape(2, 3)}, good)
    truncated, legacy_truncated, garbage = tmp_path / "truncated.bin", tmp_path / "legacy.bin", tmp_path / "garbage.bin"
    truncated.write_bytes(good.read_bytes()[:-40])
    torch.save({"weight": torch.ones(8)}, legacy_truncated, _use_new_zipfile_serialization=False)
    legacy_truncated.write_bytes(legacy_truncated.read_bytes()[:-5])
    garbage.write_bytes(b"\x80\x04not really a pickle")

    assert torch.equal(load_pickle_state_dict(str(good))["weight"], torch.arange(6.0).reshape(2, 3))
    for victim in (truncated, legacy_truncated, garbage):
        with pytest.raises(
            CorruptCheckpointError, match=rf"Cannot read {re.escape(str(victim))} .*truncated or corrupt"
        ):
            load_pickle_state_dict(str(victim))
        try:
            load_pickle_state_dict(str(victim))
        except CorruptCheckpointError as error:
            assert not isinstance(error, UnsafePickleError) and "\n" not in str(error)


def test_a_pickle_that_is_no_state_dict_is_named(tmp_path):
    victim = tmp_path / "pytorch_model.bin"
    torch.save([torch.ones(2)], victim)  # weights-only safe, but a list

    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(victim))} is a PyTorch pickle, but not a state"):
        load_pickle_state_dict(str(victim))
