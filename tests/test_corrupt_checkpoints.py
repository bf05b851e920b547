"""A corrupt checkpoint is a named error that names the file and says what to do, before the load: never an unrelated
traceback, a hang, or a silently random (or NaN) head.

What cannot be detected is said here too: safetensors has no checksums, so a bit flip in a weight's data loads (the
value head's data is checked for NaN and infinity only); the base model's weights are not scanned.
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import build_bare, policy_lora, save_reward_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_layouts import classifier
from test_loading import save_trl_pickle_layout, trl_head
from transformers import AutoModelForSequenceClassification

from transformers_vhead import AutoModelForCausalLMWithValueHead
from transformers_vhead.errors import CorruptCheckpointError, InvalidConfigError, TransformersVheadError
from transformers_vhead.layouts import find_value_head, layout_fields
from transformers_vhead.safe_reading import read_safetensors_header
from transformers_vhead.sources import SourceFiles, checkpoint_tensor_files

HIDDEN = 32
HEAD = "v_head.summary.weight"


def _find_head(path):
    """The head `from_pretrained` would find in `path`, its layout told by the fields of its config.json."""
    files = SourceFiles(path, {})
    return find_value_head(files, layout_fields(files.config_dict()))


def _seeded_model(seed: int = 3) -> AutoModelForCausalLMWithValueHead:
    model = AutoModelForCausalLMWithValueHead(build_bare("llama"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.v_head.summary.weight.copy_(torch.randn(1, HIDDEN, generator=generator))
        model.v_head.summary.bias.copy_(torch.randn(1, generator=generator))
    return model


def _head_shard(path: Path) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][HEAD]


def _replace_tensor(file: Path, key: str, tensor: torch.Tensor) -> None:
    """Writes `file` again (safetensors or a pickle) with `key` replaced by `tensor`."""
    if file.suffix == ".safetensors":
        save_file({**load_file(file), key: tensor}, file, metadata={"format": "pt"})
    else:
        torch.save({**torch.load(file, weights_only=True), key: tensor}, file)


# Each builder writes a checkpoint with a value head and returns (directory to load, the head's file, its key there).
def _ours(tmp_path):
    _seeded_model().save_pretrained(tmp_path / "ours")
    return tmp_path / "ours", tmp_path / "ours" / "model.safetensors", HEAD


def _ours_sharded(tmp_path):
    _seeded_model().save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    return tmp_path / "ours", _head_shard(tmp_path / "ours"), HEAD


def _trl_pickle(tmp_path):
    save_trl_pickle_layout(tmp_path, trl_head())
    return tmp_path, tmp_path / "pytorch_model.bin", HEAD


def _llama_factory_bin(tmp_path):
    build_bare("llama").save_pretrained(tmp_path)
    torch.save(trl_head(), tmp_path / "value_head.bin")
    return tmp_path, tmp_path / "value_head.bin", HEAD


def _sequence_classifier(tmp_path):
    classifier(AutoModelForSequenceClassification, "llama", tmp_path)
    return tmp_path, tmp_path / "model.safetensors", "score.weight"


def _policy(tmp_path) -> Path:
    build_bare("llama").save_pretrained(tmp_path / "llama")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "llama", peft_config=policy_lora())
    policy.save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def _beside_an_adapter(tmp_path):
    path = _policy(tmp_path)
    return path, path / "value_head.safetensors", HEAD


def _trl_peft(tmp_path):
    """TRL's PEFT layout: the adapter and a `pytorch_model.bin` holding only `v_head.*`."""
    path = _policy(tmp_path)
    (path / "value_head.safetensors").unlink()
    torch.save(trl_head(), path / "pytorch_model.bin")
    return path, path / "pytorch_model.bin", HEAD


LAYOUTS = {
    "ours": _ours,
    "ours, sharded": _ours_sharded,
    "TRL pytorch_model.bin": _trl_pickle,
    "LLaMA-Factory value_head.bin": _llama_factory_bin,
    "HF sequence classifier": _sequence_classifier,
    "value_head.safetensors beside an adapter": _beside_an_adapter,
    "TRL PEFT pytorch_model.bin": _trl_peft,
}


# --- the value head's dtype and values ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_head_of_an_integer_dtype_is_refused_naming_file_and_tensor(tmp_path, layout):
    source, file, key = LAYOUTS[layout](tmp_path)
    _replace_tensor(file, key, torch.ones(1, HIDDEN, dtype=torch.int64))

    with pytest.raises(CorruptCheckpointError, match=rf"{file} holds the value head's `{key}` as int64, but"):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)


def test_a_head_of_bool_is_refused(tmp_path):
    source, file, key = _ours(tmp_path)
    _replace_tensor(file, key, torch.ones(1, HIDDEN, dtype=torch.bool))

    with pytest.raises(CorruptCheckpointError, match=rf"`{key}` as bool, but a value head's weights are floating"):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)


@pytest.mark.parametrize("layout", ["ours", "value_head.safetensors beside an adapter"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_head_loads_cast_to_float32(tmp_path, layout, dtype):
    source, file, key = LAYOUTS[layout](tmp_path)
    head = torch.linspace(-1, 1, HIDDEN, dtype=dtype).reshape(1, HIDDEN)
    _replace_tensor(file, key, head)

    model = AutoModelForCausalLMWithValueHead.from_pretrained(source)
    assert model.v_head.summary.weight.dtype == torch.float32
    assert torch.equal(model.v_head.summary.weight, head.float())
    assert model.v_head_source.file == str(file)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_head_with_nan_is_refused_naming_file_and_tensor(tmp_path, layout):
    source, file, key = LAYOUTS[layout](tmp_path)
    head = torch.zeros(1, HIDDEN)
    head[0, 3] = float("nan")
    _replace_tensor(file, key, head)

    with pytest.raises(
        CorruptCheckpointError, match=rf"{file} holds NaN or infinity in the value head's `{key}` \(1 of"
    ):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)


@pytest.mark.parametrize("key", [HEAD, "v_head.summary.bias"])
def test_an_infinite_head_weight_or_bias_is_refused_and_says_what_to_do(tmp_path, key):
    source, file, _ = _ours(tmp_path)
    _replace_tensor(file, key, torch.full((1, HIDDEN) if key == HEAD else (1,), float("-inf")))

    with pytest.raises(CorruptCheckpointError, match=rf"`{key}`.*diverged, or the file is corrupt") as error:
        AutoModelForCausalLMWithValueHead.from_pretrained(source)
    assert "earlier checkpoint" in str(error.value) and "fresh head" in str(error.value)


def test_a_bit_flip_in_the_heads_data_that_makes_it_nan_is_caught_and_one_in_the_base_weights_is_not(tmp_path):
    """safetensors has no checksums: a flipped bit in a weight's data reads as another value. The head's data is
    checked for NaN and infinity; the base weights are not scanned (that would cost a full read)."""
    source, file, _ = _ours(tmp_path)
    _replace_tensor(file, HEAD, torch.full((1, HIDDEN), 1.5))  # exponent 127: its top bit flipped gives NaN
    good = file.read_bytes()
    original = {key: tensor.clone() for key, tensor in load_file(file).items()}
    header_length = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + header_length])

    def flip(key: str, byte: int, bit: int) -> None:
        data = bytearray(good)
        data[8 + header_length + header[key]["data_offsets"][0] + byte] ^= 1 << bit
        file.write_bytes(bytes(data))

    flip(HEAD, 3, 6)  # the top bit of the first value's exponent (little-endian float32)
    with pytest.raises(CorruptCheckpointError, match=rf"{file} holds NaN or infinity in the value head's `{HEAD}`"):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)

    base_key = "pretrained_model.model.norm.weight"
    flip(base_key, 0, 0)  # the lowest mantissa bit of the first value
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(source).state_dict()
    assert loaded[base_key][0] != original[base_key][0]  # loaded one ulp off: undetectable
    assert torch.equal(loaded[base_key][1:], original[base_key][1:])
    assert all(torch.equal(loaded[key], tensor) for key, tensor in original.items() if key != base_key)


# --- safetensors headers -----------------------------------------------------------------------------------------


def _write_safetensors(path: Path, header: object, data: bytes, length: int | None = None) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


_ENTRY_A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
_ENTRY_B = {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}
HEADER_DEFECTS = {
    "truncated data": ({"a": _ENTRY_A, "b": _ENTRY_B}, 36, None),
    "data longer than the header says": ({"a": _ENTRY_A, "b": _ENTRY_B}, 44, None),
    "unknown dtype": ({"a": {**_ENTRY_A, "dtype": "F33"}, "b": _ENTRY_B}, 40, None),
    "negative dimension": ({"a": {**_ENTRY_A, "shape": [-2, 3]}, "b": _ENTRY_B}, 40, None),
    "float dimension": ({"a": {**_ENTRY_A, "shape": [2.0, 3]}, "b": _ENTRY_B}, 40, None),
    "offsets that do not fit shape x dtype": ({"a": {**_ENTRY_A, "shape": [3, 3]}, "b": _ENTRY_B}, 40, None),
    "overlapping tensors": ({"a": _ENTRY_A, "b": {**_ENTRY_B, "data_offsets": [16, 32]}}, 32, None),
    "a hole between tensors": ({"a": _ENTRY_A, "b": {**_ENTRY_B, "data_offsets": [28, 44]}}, 44, None),
    "no data_offsets": ({"a": {"dtype": "F32", "shape": [6]}}, 24, None),
    "metadata that is not str to str": ({"__metadata__": {"format": 1}, "a": _ENTRY_A}, 24, None),
    "a header that is a JSON list": ([1, 2], 0, None),
    "a header length past the end of the file": ({"a": _ENTRY_A}, 24, 10**6),
    "a header length cutting the JSON": ({"a": _ENTRY_A}, 24, 5),
    "a header length of zero": ({"a": _ENTRY_A}, 24, 0),
}


@pytest.mark.parametrize("defect", HEADER_DEFECTS)
def test_every_kind_of_invalid_safetensors_header_is_named(tmp_path, defect):
    header, data_size, length = HEADER_DEFECTS[defect]
    path = _write_safetensors(tmp_path / "model.safetensors", header, bytes(data_size), length)

    with pytest.raises(CorruptCheckpointError, match=rf"{path} is not a valid safetensors file \(.+\): it is trunc"):
        read_safetensors_header(str(path))


def test_a_valid_header_is_read_with_shapes_and_dtypes(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int64)}, path)

    infos = read_safetensors_header(str(path))
    assert {name: (info.shape, info.dtype, info.is_floating_point) for name, info in infos.items()} == {
        "a": ((2, 3), "float32", True),
        "b": ((4,), "int64", False),
    }


@pytest.mark.parametrize("where", ["length field", "JSON header"])
def test_a_bit_flip_in_a_shard_header_names_the_shard_before_the_load(tmp_path, where):
    _seeded_model().save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[7 if where == "length field" else 9] ^= 0x10  # the top byte of the length; the header's `{"` -> `{2`
    victim.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_a_header_byte_that_turns_a_float_weight_into_integers_is_named(tmp_path, dtype):
    """`F32` -> `I32` is one byte, and describes a valid file of the same size: transformers would cast the bytes to
    garbage values (1.0 becomes 1065353216.0) without a word."""
    source, file, _ = _ours(tmp_path)
    key = "pretrained_model.model.norm.weight"
    data = bytearray(file.read_bytes())
    entry = f'"{key}":{{"dtype":"F32"'.encode()
    data[data.index(entry) + len(entry) - 4] = ord(dtype[0])
    file.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError, match=rf"{file} holds the weight `{key}` as u?int32, but the model's"):
        AutoModelForCausalLMWithValueHead.from_pretrained(source)


def test_integer_weights_of_a_quantized_checkpoint_are_not_refused(tmp_path):
    """A pre-quantized checkpoint (bitsandbytes' int8 `weight`, ...) says so in its config.json."""
    build_bare("llama").config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.int8)}, tmp_path / "model.safetensors")

    assert _find_head(tmp_path) is None  # no head, and no error
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="as int8, but the model's weights are floating point"):
        _find_head(tmp_path)


# --- sharded indexes ---------------------------------------------------------------------------------------------


def _sharded(tmp_path) -> tuple[Path, dict]:
    _seeded_model().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return tmp_path / "model.safetensors.index.json", index


def test_an_index_naming_a_missing_shard_is_named(tmp_path):
    index_file, index = _sharded(tmp_path)
    missing = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / missing).unlink()

    with pytest.raises(CorruptCheckpointError, match=rf"{index_file} names 1 shard\(s\) that are not there: {missing}"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_an_index_listing_a_key_its_shard_does_not_hold_is_named(tmp_path):
    index_file, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    key = next(key for key, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][key] = shards[1]
    index_file.write_text(json.dumps(index))

    with pytest.raises(CorruptCheckpointError, match=rf"lists {key} in {tmp_path / shards[1]}, which does not hold"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_a_head_its_shard_holds_but_the_index_does_not_list_is_found_and_loaded(tmp_path):
    """transformers loads every tensor of every shard the index names: the head it loads is the saved one, so it is
    reported as loaded from that shard (issue 15, item 6b)."""
    index_file, index = _sharded(tmp_path)
    head_shard = tmp_path / index["weight_map"][HEAD]
    saved = load_file(head_shard)
    for key in ("v_head.summary.weight", "v_head.summary.bias"):
        del index["weight_map"][key]
    index_file.write_text(json.dumps(index))

    files = checkpoint_tensor_files(SourceFiles(tmp_path, {}))
    assert files[HEAD] == str(head_shard)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert model.v_head_source.is_loaded and model.v_head_source.file == str(head_shard)
    assert torch.equal(model.v_head.summary.weight, saved[HEAD])
    assert torch.equal(model.v_head.summary.bias, saved["v_head.summary.bias"])


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"metadata": {}}), "needs a `weight_map` object"),
        (json.dumps({"weight_map": {HEAD: "model-00001-of-00003.safetensors"}}), "and a `metadata` object"),
        (json.dumps({"metadata": {}, "weight_map": {HEAD: "../elsewhere.safetensors"}}), "names shards outside"),
    ],
    ids=["not JSON", "no weight_map", "no metadata", "a shard outside the checkpoint"],
)
def test_an_invalid_index_is_named(tmp_path, content, says):
    index_file, _ = _sharded(tmp_path)
    index_file.write_text(content)

    with pytest.raises(CorruptCheckpointError, match=rf"{index_file} .*{says}"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)


def test_a_config_beside_an_adapter_that_is_not_json_is_named(tmp_path):
    path = _policy(tmp_path)
    (path / "config.json").write_text("{not json")

    with pytest.raises(InvalidConfigError, match=rf"{path / 'config.json'} is not valid JSON"):
        AutoModelForCausalLMWithValueHead.from_pretrained(path)


# --- fuzzing the header (hypothesis) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, bytes, dict[str, torch.Tensor]]:
    """A saved tiny checkpoint of ours: its directory, its `model.safetensors` bytes, its tensors."""
    path = tmp_path_factory.mktemp("fuzz") / "model"
    _seeded_model().save_pretrained(path)
    return path, (path / "model.safetensors").read_bytes(), load_file(path / "model.safetensors")


def _header_span(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@settings(
    max_examples=60,
    deadline=10_000,  # per example, generous for a loaded 2-core CI machine: a hang fails, a load takes ~0.2 s
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    kind=st.sampled_from(["flip", "overwrite"]),
    bit=st.integers(0, 7),
    byte=st.integers(0, 255),
)
def test_a_corrupted_header_is_a_named_error_or_loads_every_tensor_exactly(saved, position, kind, bit, byte):
    """Random single-bit flips and byte overwrites within the 8-byte length and the JSON header of a saved
    checkpoint's `model.safetensors`: the load raises one of our errors (never another exception type) or gives a model
    whose every tensor equals the saved one, bit for bit. (Most are refused by safetensors' header check; a renamed
    tensor is `CheckpointMismatchError`, a float dtype made an integer one of the same width is refused too.)"""
    source, original, tensors = saved
    data = bytearray(original)
    index = int(position * _header_span(original))
    data[index] = data[index] ^ (1 << bit) if kind == "flip" else byte
    with tempfile.TemporaryDirectory() as directory:
        for name in ("config.json", "generation_config.json"):
            shutil.copy(source / name, directory)
        Path(directory, "model.safetensors").write_bytes(bytes(data))
        try:
            model = AutoModelForCausalLMWithValueHead.from_pretrained(directory)
        except TransformersVheadError:
            return
        loaded = model.state_dict()
        assert set(loaded) == set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(loaded[key], tensor), key


def _as_safetensors(header: object) -> bytes:
    """`header` as a safetensors file's header, with the right length field, and 16 bytes of data."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(16)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    contents=st.one_of(
        st.binary(max_size=200),  # anything
        st.binary(max_size=120).map(lambda rest: struct.pack("<Q", len(rest)) + rest),  # a plausible length field
        st.recursive(  # a JSON header of any shape, with a right length, and some data
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
            lambda children: (
                st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
            ),
            max_leaves=12,
        ).map(_as_safetensors),
        st.fixed_dictionaries(  # a tensor entry with arbitrary fields
            {
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "F8_E8M0", "F4", "C64", "X"]),
                "shape": st.lists(st.integers(-2, 5), max_size=3),
                "data_offsets": st.lists(st.integers(-2, 40), min_size=0, max_size=3),
            }
        ).map(lambda entry: _as_safetensors({"t": entry})),
    )
)
def test_read_safetensors_header_only_ever_raises_corrupt_checkpoint_error(contents):
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(contents)
        file.flush()
        try:
            infos = read_safetensors_header(file.name)
        except CorruptCheckpointError:
            return
        assert all(isinstance(info.shape, tuple) and isinstance(info.dtype, str) for info in infos.values())


# --- adapters ----------------------------------------------------------------------------------------------------


def test_a_truncated_adapter_weights_file_is_named_before_peft_reads_it(tmp_path):
    path = _policy(tmp_path)
    victim = path / "adapter_model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])

    with pytest.raises(CorruptCheckpointError, match=rf"{victim} is not a valid safetensors file"):
        AutoModelForCausalLMWithValueHead.from_pretrained(path)


@pytest.fixture
def reward_dir(tmp_path) -> tuple[Path, Path]:
    """A tiny Llama and a reward adapter of it."""
    build_bare("llama").save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", save_reward_adapter(tmp_path / "llama", tmp_path / "reward")


@pytest.mark.parametrize("value", ["nan", "int"])
def test_a_reward_head_that_is_not_finite_floating_point_is_refused(reward_dir, value):
    base, reward = reward_dir
    file = reward / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(key for key in tensors if "score" in key.split(".") and key.endswith(".weight"))
    broken = torch.full_like(tensors[key], float("nan")) if value == "nan" else tensors[key].to(torch.int32)
    save_file({**tensors, key: broken}, file, metadata={"format": "pt"})

    says = "holds NaN or infinity in the reward head's" if value == "nan" else "holds the reward head's `.*` as int32"
    with pytest.raises(CorruptCheckpointError, match=rf"{file} {says}"):
        AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=policy_lora(), reward_adapter=reward)


def test_reward_statistics_that_are_not_numbers_are_named(reward_dir):
    base, reward = reward_dir
    (reward / "config.json").write_text(json.dumps({"mean": "high", "std": 1.0}))

    with pytest.raises(
        InvalidConfigError, match=rf"reward adapter at {reward} gives the reward statistics mean='high'"
    ):
        AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=policy_lora(), reward_adapter=reward)
