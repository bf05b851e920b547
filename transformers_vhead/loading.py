"""Where a checkpoint keeps its value head, read safely.

transformers loads the weights; this module first reads what the load will read, so that a bad file is named before
transformers or peft touch it: the head's file (for its provenance, and clear shape, dtype and NaN errors), every
safetensors header (validated by safetensors' own parser, the one transformers loads with; no tensor data is read) and
every pickle (memory-mapped, with `torch.load(weights_only=True)`: a pickle that would run code is refused and never
unpickled). The value head's tensors are tiny and read whole; the base model's weights are not scanned.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers.utils import cached_file

from .errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    NoModelFoundError,
    NotInOfflineCacheError,
    UnrecognizedLayoutError,
    UnsafePickleError,
)

HEAD_WEIGHT_KEY = "v_head.summary.weight"
HEAD_BIAS_KEY = "v_head.summary.bias"
HIDDEN_LAYER_PREFIX = "v_head.hidden_layer."  # the optional MLP layer before `summary` (trlx's heads)

# The `from_pretrained` keywords that say where files come from, in the names `cached_file` takes.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")

# transformers' own lookup order: a single file before an index, safetensors before pickles.
SAFE_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Next to a PEFT adapter the value head is a file of its own: ours and LLaMA-Factory's `value_head.safetensors`,
# LLaMA-Factory's `value_head.bin`; TRL writes it to `pytorch_model.bin` (found by `find_value_head`).
ADAPTER_HEAD_NAMES = ("value_head.safetensors", "value_head.bin")


@dataclass(frozen=True)
class HeadSource:
    """Where a value head's weights came from: a checkpoint file, or a fresh initialisation."""

    file: str | None = None
    """The file the head was read from (a local path, or the hub cache's copy); `None` for a fresh head."""
    init: str | None = None
    """How a fresh head was initialised, e.g. `"normal(std=0.2)"`."""
    layout: str | None = None
    """Which writer's layout the head was read from, e.g. `"TRL"`, `"OpenRLHF"`, `"LLaMA-Factory"` (see `LAYOUTS`)."""

    @property
    def is_loaded(self) -> bool:
        return self.file is not None

    def __str__(self) -> str:
        if not self.is_loaded:
            return f"freshly initialised with {self.init} init"
        return f"loaded from {self.file} ({self.layout} layout)" if self.layout else f"loaded from {self.file}"


@dataclass(frozen=True)
class CheckpointHead:
    """The value head found in a checkpoint, in whichever writer's layout it was saved.

    `shapes` uses this package's key names (`v_head.summary.weight`, ...); `key_mapping` renames the checkpoint's own
    keys to them (transformers' `from_pretrained(key_mapping=...)`), and `settings` are the head settings the layout
    implies (trlx's MLP width, OpenRLHF's reward statistics).
    """

    file: str
    shapes: dict[str, tuple[int, ...]]
    layout: str = "TRL"
    key_mapping: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    separate_file: bool = False
    """The head is in a file of its own beside the model (LLaMA-Factory, or next to an adapter), read after the load."""
    has_lm_head: bool = True
    """False for a reward model or critic saved without its LM head (sequence/token classifiers, OpenRLHF)."""

    @property
    def has_bias(self) -> bool:
        return HEAD_BIAS_KEY in self.shapes


def _with_variant(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def resolve_file(path_or_id: str, filename: str, hub_kwargs: dict) -> str | None:
    """The local path of `filename` in a directory or hub id (the hub cache's copy), or `None` if it is not there."""
    return cached_file(
        path_or_id,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


class TensorInfo(NamedTuple):
    """One tensor of a weights file, as its header (or its memory-mapped pickle) describes it; no data is read."""

    shape: tuple[int, ...]
    dtype: str
    """torch's name of the dtype (`"float32"`, `"int64"`, `"bool"`, ...); safetensors' own name for one torch lacks."""
    is_floating_point: bool


# safetensors' dtype names, in torch's; every `F*` and `BF16` is a floating-point format.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6, which `torch.load(mmap=True)` can memory-map
# A legacy torch.save file (and a raw `pickle.dump`) is a few pickles in a row (magic number, protocol, system info,
# the object, its storage keys) before the raw tensor bytes; at most this many are disassembled.
_LEGACY_PICKLES = 5
# The opcodes that push a string (which protocol 4's STACK_GLOBAL takes as a global's module and name), store the top
# of the stack in the memo, or push a value from it.
_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_MEMO_PUT_OPCODES = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _first_line(message: object, limit: int = 200) -> str:
    """The first sentence of the first line of `message` (an error's, a reader's), at most `limit` characters: the
    messages of this module stay one line."""
    lines = str(message).strip().splitlines()
    line = lines[0].split(". ")[0] if lines else ""
    if not line and isinstance(message, BaseException):
        line = type(message).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _reason(error: BaseException) -> str:
    """What a reader's error says was wrong: torch's weights-only message wraps the reason in advice that does not
    apply (re-running with `weights_only=False`), the reason being its second-to-last paragraph."""
    paragraphs = [part for part in str(error).split("\n\n") if part.strip()]
    if isinstance(error, pickle.UnpicklingError) and len(paragraphs) >= 3:
        return _first_line(paragraphs[-2])
    return _first_line(error)


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, from its header only.

    The header is checked whole by safetensors' own parser (`safe_open`, which transformers loads with): its length
    field, that it is one JSON object, each entry's `dtype` (one safetensors knows), `shape` (non-negative integers)
    and `data_offsets` (the size that shape and dtype give, contiguous from 0 with no overlap or hole, ending at the
    end of the file), and `__metadata__` (strings to strings). A file read here is one transformers can load; a file
    refused here is named before the load. A bit flip in the tensor data cannot be seen: safetensors has no
    checksums.

    Raises:
        CorruptCheckpointError: the header is invalid, or the file is shorter or longer than it says.
    """
    with _open_safetensors(path) as file:
        return {name: _safetensors_info(file.get_slice(name)) for name in file.keys()}


@contextmanager
def _open_safetensors(path: str) -> Iterator[Any]:
    """`safe_open(path)`, which validates the header whole (see [`read_safetensors_header`]), its errors named.

    Raises:
        CorruptCheckpointError: the header is invalid, or the file is shorter or longer than it says.
    """
    try:
        with safe_open(path, framework="pt") as file:
            yield file
    except SafetensorError as exc:
        raise CorruptCheckpointError(
            f"{path} is not a valid safetensors file ({_reason(exc)}): it is truncated or corrupt. Download or save it "
            "again."
        ) from exc


def _safetensors_info(tensor_slice) -> TensorInfo:
    code = tensor_slice.get_dtype()
    floating = code.startswith(("F", "BF"))
    return TensorInfo(tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES.get(code, code), floating)


def _pickle_info(tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.dtype.is_floating_point)


def load_pickle_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped where the format allows (torch's zip format; a legacy file is read whole),
    never unpickling anything but tensors (`torch.load(weights_only=True)`).

    When torch refuses the file, the pickle is disassembled (statically, nothing is run) to tell a pickle that would
    call or build other objects, which is refused as unsafe, from a corrupt one.

    Raises:
        UnsafePickleError: unpickling the file would call or build something other than tensors (torch's weights-only
            unpickler refused it; the globals it names are listed). Nothing of it was unpickled.
        CorruptCheckpointError: the file is truncated or corrupt, or holds no state dict of named tensors.
    """
    try:
        with open(path, "rb") as file:
            memory_mappable = file.read(4) == _ZIP_MAGIC
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_mappable)
    except Exception as exc:  # UnpicklingError, RuntimeError (a bad zip), EOFError, ...: told apart below
        refused = sorted(_pickled_globals(path) - _weights_only_globals())
        if refused:
            shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
            raise UnsafePickleError(
                f"Refused to read {path} as a weights-only PyTorch state dict: unpickling it would call or build "
                f"{shown}, not tensors, which can run any code. Nothing of it was unpickled. Convert a checkpoint you "
                "trust to safetensors (load it where it was written and `save_pretrained` it again), and never load a "
                "file you did not write with `weights_only=False`."
            ) from None
        raise CorruptCheckpointError(
            f"Cannot read {path} as a weights-only PyTorch state dict ({_reason(exc)}): it is truncated or corrupt. "
            "Download or save it again."
        ) from exc
    if not (
        isinstance(state_dict, dict)
        and all(isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state_dict.items())
    ):
        raise CorruptCheckpointError(
            f"{path} is a PyTorch pickle, but not a state dict of named tensors (it holds a "
            f"{type(state_dict).__name__}{' with other values' if isinstance(state_dict, dict) else ''}): it is not a "
            "model's weights file. Save the model with `save_pretrained`."
        )
    return state_dict


def _weights_only_globals() -> set[str]:
    """The globals torch's weights-only unpickler accepts: its defaults and those allowlisted with
    `torch.serialization.add_safe_globals`. (torch keeps the list private; without it, every global counts as
    unsafe, which only changes which error a refused file gets.)"""
    from torch import _weights_only_unpickler as unpickler

    defaults = getattr(unpickler, "_get_allowed_globals", dict)()
    user = getattr(unpickler, "_get_user_allowed_globals", dict)()
    return set(defaults) | set(user)


def _pickled_globals(path: str) -> set[str]:
    """Every global (`module.name`) the pickles of a `.bin` name, by disassembling them: `data.pkl` of torch's zip
    format, or the first pickles of a legacy or raw file. Best effort: a corrupt part ends the scan, keeping what was
    found before it."""
    found: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as stream:
                            _scan_pickle(stream, found)
        else:
            with open(path, "rb") as stream:
                for _ in range(_LEGACY_PICKLES):
                    if not _scan_pickle(stream, found):
                        break
    except Exception:  # an archive too broken to list: the file is corrupt, whatever it names
        pass
    return found


def _scan_pickle(stream, found: set[str]) -> bool:
    """Adds the globals one pickle of `stream` names to `found`; False when it is not a whole pickle."""
    pushed: list[str | None] = [None, None]  # the last two values pushed, for STACK_GLOBAL
    memo: dict[Any, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                module, attribute = pushed
                found.add(f"{module}.{attribute}" if module and attribute else "a global named at unpickling time")
            if name in _MEMO_PUT_OPCODES:
                memo[len(memo) if arg is None else arg] = pushed[-1]
                continue
            if name in _STRING_OPCODES and isinstance(arg, str):
                value = arg
            else:
                value = memo.get(arg) if name in _MEMO_GET_OPCODES else None
            pushed = [pushed[-1], value]
    except Exception:  # not a pickle (raw tensor bytes after a legacy file's pickles), or a corrupt one
        return False
    return True


def read_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file (from its header only) or a weights-only pickle."""
    return {name: info.shape for name, info in read_tensor_infos(path).items()}


def read_tensor_infos(path: str) -> dict[str, TensorInfo]:
    """The shape and dtype of every tensor in a safetensors file (from its header only) or a weights-only pickle
    (memory-mapped)."""
    if path.endswith(".safetensors"):
        return read_safetensors_header(path)
    return {name: _pickle_info(tensor) for name, tensor in load_pickle_state_dict(path).items()}


def read_tensors(path: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a weights-only pickle whose names `keep` accepts; a safetensors file
    reads only those (after its header is checked)."""
    if path.endswith(".safetensors"):
        with _open_safetensors(path) as file:
            return {name: file.get_tensor(name) for name in file.keys() if keep(name)}
    return {name: tensor for name, tensor in load_pickle_state_dict(path).items() if keep(name)}


class WeightsReader:
    """Reads the weights files of one load as the load will, each file once: a safetensors file's header (validated
    whole), a pickle memory-mapped (its tensors kept, for the head's values). Of each tensor its name and whether it
    is floating point are kept; the shapes of only the tensors asked for are looked at, and only the head's data is
    read. Dropped when the look-up ends, before the load."""

    def __init__(self):
        self._floating: dict[str, dict[str, bool]] = {}
        self._pickles: dict[str, dict[str, torch.Tensor]] = {}

    def _read(self, path: str) -> dict[str, bool]:
        if path not in self._floating:
            if path.endswith(".safetensors"):
                with _open_safetensors(path) as file:
                    floating = {name: file.get_slice(name).get_dtype().startswith(("F", "BF")) for name in file.keys()}
            else:
                self._pickles[path] = load_pickle_state_dict(path)
                floating = {name: tensor.dtype.is_floating_point for name, tensor in self._pickles[path].items()}
            self._floating[path] = floating
        return self._floating[path]

    def keys(self, path: str) -> Collection[str]:
        """The names of the tensors in `path`, in its order (the file is checked, see [`read_safetensors_header`] and
        [`load_pickle_state_dict`])."""
        return self._read(path).keys()

    def not_floating(self, path: str) -> list[str]:
        """The tensors of `path` whose dtype is not floating point (integers, bool)."""
        return [name for name, floating in self._read(path).items() if not floating]

    def info(self, path: str, name: str) -> TensorInfo:
        """The shape and dtype of tensor `name` of `path`."""
        if path in self._pickles:
            return _pickle_info(self._pickles[path][name])
        with _open_safetensors(path) as file:
            return _safetensors_info(file.get_slice(name))

    def tensors(self, path: str, names: Collection[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` of `path` (a safetensors file reads only those)."""
        if path in self._pickles:
            return {name: self._pickles[path][name] for name in names}
        with _open_safetensors(path) as file:
            return {name: file.get_tensor(name) for name in names}


def hub_kwargs_of(kwargs: dict) -> dict:
    """The keywords among `kwargs` that say where files come from (see `HUB_KWARGS`)."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def read_config_dict(path_or_id: str, hub_kwargs: dict) -> dict[str, Any]:
    """The `config.json` of a directory or hub id as a dict (`{}` when there is none).

    Raises:
        InvalidConfigError: the file is not a JSON object.
    """
    resolved = resolve_file(str(path_or_id), "config.json", hub_kwargs)
    if resolved is None:
        return {}
    try:
        with open(resolved, encoding="utf-8") as file:
            config = json.load(file)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise InvalidConfigError(
            f"{resolved} is not valid JSON ({_first_line(exc)}): the config is corrupt. Save or download the "
            "checkpoint again."
        ) from exc
    if not isinstance(config, dict):
        raise InvalidConfigError(
            f"{resolved} holds a JSON {type(config).__name__}, not an object of settings: it is no model config. Save "
            "or download the checkpoint again."
        )
    return config


def _explicit_weights_name(config: dict[str, Any]) -> str | None:
    """A config's `transformers_weights`: the weights file transformers loads instead of its usual names."""
    name = config.get("transformers_weights")
    return name if isinstance(name, str) and name else None


def checkpoint_tensor_files(
    path_or_id: str | os.PathLike,
    hub_kwargs: dict,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    weights_name: str | None = None,
    reader: WeightsReader | None = None,
) -> dict[str, str] | None:
    """The name of every tensor the load of `path_or_id` will read, with the local file that holds it; `None` when
    there are no weights.

    Looks at the same files as `PreTrainedModel.from_pretrained`, in its order, and reads each one as the load will,
    before it (headers and memory-mapped pickles, see [`WeightsReader`]), so a bad file is named here rather than
    failing deep inside the load, and a pickle that would run code is refused before transformers opens it. A sharded
    checkpoint's names are those its shards hold: transformers loads every tensor of every shard the index names, also
    one the index does not list.

    Args:
        path_or_id: a local directory or a hub id.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, `subfolder`, ... as for `cached_file`.
        variant: the weights variant (`model.<variant>.safetensors`).
        use_safetensors: `False` reads only pickles, `True` only safetensors, `None` prefers safetensors.
        weights_name: a file tried first (a config's `transformers_weights`, which transformers loads instead).
        reader: the reader to read the files with (and to keep what was read); a fresh one by default.

    Raises:
        CorruptCheckpointError: a weights file is truncated or corrupt; an index is not valid, names a shard that is
            not there (or outside the checkpoint), or lists a tensor its shard does not hold.
        UnsafePickleError: a pickle that would run code or build other objects than tensors.
    """
    path_or_id = str(path_or_id)
    reader = reader or WeightsReader()
    names = [weights_name] if weights_name else []
    if use_safetensors is not False:
        names += [_with_variant(name, variant) for name in SAFE_WEIGHTS_NAMES]
    if not use_safetensors:
        names += [_with_variant(name, variant) for name in PICKLE_WEIGHTS_NAMES]
    for name in names:
        resolved = resolve_file(path_or_id, name, hub_kwargs)
        if resolved is None:
            continue
        if not name.endswith(".json"):
            return dict.fromkeys(reader.keys(resolved), resolved)
        return _sharded_tensor_files(path_or_id, resolved, hub_kwargs, reader)
    return None


def _read_index(index_file: str) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index (tensor name to shard file), checked as transformers reads it
    (it also reads the `metadata` object)."""
    try:
        with open(index_file, encoding="utf-8") as file:
            index = json.load(file)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CorruptCheckpointError(
            f"{index_file} is not valid JSON ({_first_line(exc)}): the index is corrupt. Save or download the "
            "checkpoint again."
        ) from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (
        isinstance(weight_map, dict)
        and all(isinstance(shard, str) for shard in weight_map.values())
        and isinstance(index.get("metadata"), dict)
    ):
        raise CorruptCheckpointError(
            f"{index_file} is not a sharded checkpoint's index: it needs a `weight_map` object from tensor names to "
            "shard file names, and a `metadata` object. Save or download the checkpoint again."
        )
    escaping = sorted(shard for shard in set(weight_map.values()) if os.path.isabs(shard) or ".." in shard.split("/"))
    if escaping:
        raise CorruptCheckpointError(
            f"{index_file} names shards outside the checkpoint ({', '.join(escaping[:3])}): an index only names files "
            "beside it. Save or download the checkpoint again."
        )
    return weight_map


def _sharded_tensor_files(path_or_id: str, index_file: str, hub_kwargs: dict, reader: WeightsReader) -> dict[str, str]:
    listed: dict[str, list[str]] = {}
    for key, shard in _read_index(index_file).items():
        listed.setdefault(shard, []).append(key)
    paths = {shard: resolve_file(path_or_id, shard, hub_kwargs) for shard in sorted(listed)}
    missing = [shard for shard, path in paths.items() if path is None]
    if missing:
        raise CorruptCheckpointError(
            f"{index_file} names {len(missing)} shard(s) that are not there: {_listing(missing)}. The checkpoint was "
            "not saved or downloaded completely: save or download it again."
        )
    files: dict[str, str] = {}
    for shard, path in paths.items():  # transformers' order: a tensor in two shards is the later shard's
        held = reader.keys(path)
        absent = [key for key in listed[shard] if key not in held]
        if absent:
            raise CorruptCheckpointError(
                f"{index_file} lists {_listing(absent)} in {path}, which does not hold it: the index and its shards "
                "are from different saves, or the shard is corrupt. Save or download the checkpoint again."
            )
        files.update(dict.fromkeys(held, path))
    return files


def _listing(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class _HeadMatch:
    layout: str
    head_keys: dict[str, str]  # the checkpoint's head keys -> ours
    prefix_mapping: dict[str, str] = field(default_factory=dict)  # renames the base model's keys (a regex each)
    has_lm_head: bool = True


# trlx's `make_head`: Linear(hidden, 2 * hidden), ReLU, Linear(2 * hidden, 1), as `v_head.0` and `v_head.2`.
_TRLX_HEAD_KEYS = {
    "v_head.0.weight": HIDDEN_LAYER_PREFIX + "weight",
    "v_head.0.bias": HIDDEN_LAYER_PREFIX + "bias",
    "v_head.2.weight": HEAD_WEIGHT_KEY,
    "v_head.2.bias": HEAD_BIAS_KEY,
}

# Where peers keep a one-layer scalar head (`<prefix>.weight` of shape (1, hidden), bias or not), tried after the
# config's own `value_head_prefix` (OpenRLHF): `score` (OpenRLHF since Dec 2024, transformers' sequence- and, for most
# families, token-classification heads) and `value_head` (OpenRLHF before). `classifier` is the token-classification
# head of GPT-2-like families, tried only when the config names such an architecture.
LINEAR_HEAD_PREFIXES = ("score", "value_head")
_CLASSIFIER_ARCHITECTURES = ("ForSequenceClassification", "ForTokenClassification")


def _linear_head_layout(config: dict[str, Any], prefix: str) -> str:
    architecture = (config.get("architectures") or [""])[0]
    if "value_head_prefix" in config or "normalize_reward" in config or prefix == "value_head":
        return "OpenRLHF"
    if architecture.endswith("ForSequenceClassification"):
        return "HF sequence classification"
    if architecture.endswith("ForTokenClassification"):
        return "HF token classification (verl)"
    return f"`{prefix}` head"


def match_head(keys: Collection[str], config: dict[str, Any], lm_prefix: str | None = None) -> _HeadMatch | None:
    """Which writer's layout a checkpoint's value head is in, from its tensor names and its `config.json`.

    Args:
        keys: every tensor name of the checkpoint.
        config: its `config.json`, as a dict.
        lm_prefix: the `base_model_prefix` of the language model it holds (DeepSpeed-Chat saved the bare backbone).

    Raises:
        UnrecognizedLayoutError: a trlx value branch (its own copy of the top layers), which one head cannot hold.
    """
    keys = set(keys)
    if HEAD_WEIGHT_KEY in keys:
        native = any(key.startswith("pretrained_model.") for key in keys)
        head_keys = {key: key for key in keys if key.startswith("v_head.")}
        return _HeadMatch("transformers-vhead" if native else "TRL", head_keys)
    if any(key.startswith("v_head.decoder_blocks.") for key in keys):
        raise UnrecognizedLayoutError(
            "This is a trlx checkpoint with a value branch (num_value_layers_unfrozen > 0): its critic has its own "
            "trainable copy of the top decoder layers, which a value head on the shared final hidden state cannot "
            "hold. Load it with trlx, or train with num_value_layers_unfrozen=0."
        )
    if "v_head.0.weight" in keys and "v_head.2.weight" in keys:
        head_keys = {key: ours for key, ours in _TRLX_HEAD_KEYS.items() if key in keys}
        return _HeadMatch("trlx", head_keys, {r"^base_model\.": ""})
    if "v_head.weight" in keys and lm_prefix and any(key.startswith("rwtransformer.") for key in keys):
        mapping = {r"^rwtransformer\.": f"{lm_prefix}."}
        return _HeadMatch("DeepSpeed-Chat", {"v_head.weight": HEAD_WEIGHT_KEY}, mapping, has_lm_head=False)
    prefixes = [config.get("value_head_prefix"), *LINEAR_HEAD_PREFIXES]
    if (config.get("architectures") or [""])[0].endswith(_CLASSIFIER_ARCHITECTURES):
        prefixes.append("classifier")
    for prefix in filter(None, prefixes):
        if f"{prefix}.weight" in keys:
            head_keys = {f"{prefix}.weight": HEAD_WEIGHT_KEY}
            if f"{prefix}.bias" in keys:
                head_keys[f"{prefix}.bias"] = HEAD_BIAS_KEY
            return _HeadMatch(_linear_head_layout(config, prefix), head_keys, has_lm_head=False)
    return None


def _layout_settings(match: _HeadMatch, shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, Any]:
    """The head settings a layout implies: trlx's MLP width (and no dropout: trlx's head has none), OpenRLHF's reward
    statistics."""
    if match.layout == "trlx":
        return {"v_head_hidden_size": shapes[HIDDEN_LAYER_PREFIX + "weight"][0], "summary_dropout_prob": 0.0}
    if match.layout == "OpenRLHF" and config.get("mean") is not None and config.get("std") is not None:
        return {"score_mean": config["mean"], "score_std": config["std"]}
    return {}


def find_value_head(
    path_or_id: str | os.PathLike,
    hub_kwargs: dict,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    lm_prefix: str | None = None,
) -> CheckpointHead | None:
    """Finds the value head of the checkpoint transformers will load from `path_or_id`, in any layout we read.

    Layouts (see `match_head`): ours and TRL's (`v_head.summary.*` among the model's keys, in one file or one shard),
    trlx (`base_model.*` and an MLP `v_head.{0,2}.*`), DeepSpeed-Chat (`rwtransformer.*` and `v_head.weight`),
    OpenRLHF (`<value_head_prefix>.weight`, `score.weight` or `value_head.weight`, reward statistics in the config),
    transformers' sequence classification (`score.weight`, no bias) and token classification (verl's critic:
    `score` or `classifier` with a bias), and LLaMA-Factory (`value_head.safetensors` / `value_head.bin` beside an
    ordinary checkpoint).

    Args:
        path_or_id, hub_kwargs, variant, use_safetensors: as for `checkpoint_tensor_files`.
        lm_prefix: the `base_model_prefix` of the language model the checkpoint holds.

    Returns:
        The head's file, shapes (in our key names), layout, the key mapping and settings that load it; `None` when the
        checkpoint has no value head (a plain LM) or no weights at all.

    Raises:
        CorruptCheckpointError: a weights file or index is corrupt (see [`checkpoint_tensor_files`]), or the head's
            tensors are not floating point or hold NaN or infinity (see [`check_head_tensors`]).
        UnsafePickleError: a pickle the load would read would run code.
        InvalidConfigError: the `config.json` is not a JSON object.
    """
    path_or_id = str(path_or_id)
    config = read_config_dict(path_or_id, hub_kwargs)
    reader = WeightsReader()
    files = checkpoint_tensor_files(
        path_or_id, hub_kwargs, variant, use_safetensors, _explicit_weights_name(config), reader
    )
    if files:
        match = match_head(files.keys(), config, lm_prefix)
        if match is not None:
            check_head_tensors(reader, {key: files[key] for key in match.head_keys})  # first: its message is plainer
        check_weight_dtypes(reader, files, config)
        if match is not None:
            shapes = {ours: reader.info(files[key], key).shape for key, ours in match.head_keys.items()}
            key_mapping = {rf"^{re.escape(key)}$": ours for key, ours in match.head_keys.items() if key != ours}
            return CheckpointHead(
                file=files[next(key for key, ours in match.head_keys.items() if ours == HEAD_WEIGHT_KEY)],
                shapes=shapes,
                layout=match.layout,
                key_mapping={**match.prefix_mapping, **key_mapping},
                settings=_layout_settings(match, shapes, config),
                has_lm_head=match.has_lm_head,
            )
    return _head_file_beside(path_or_id, hub_kwargs, "LLaMA-Factory", reader)  # kept out of the model's checkpoint


def _is_quantized(config: dict[str, Any]) -> bool:
    text_config = config.get("text_config")
    return "quantization_config" in config or (isinstance(text_config, dict) and "quantization_config" in text_config)


def check_weight_dtypes(reader: WeightsReader, files: dict[str, str], config: dict[str, Any]) -> None:
    """Refuses a `*.weight` tensor of an integer or bool dtype in a checkpoint whose `config.json` declares no
    quantization: a header whose `F32` became `I32` (one byte) describes a valid file, whose bytes transformers would
    cast to garbage values without a word. (Biases and buffers are left alone: old GPT-2 checkpoints keep a bool
    `attn.bias` mask.) Only the dtypes already read with the headers are looked at.

    Raises:
        CorruptCheckpointError: names the file and the tensor.
    """
    if _is_quantized(config):
        return
    for file in dict.fromkeys(files.values()):
        for key in reader.not_floating(file):
            if key.endswith(".weight") and files.get(key) == file:
                raise CorruptCheckpointError(
                    f"{file} holds the weight `{key}` as {reader.info(file, key).dtype}, but the model's weights are "
                    "floating point and its config.json declares no quantization: the file's header is corrupt (the "
                    "tensor would load as garbage values). Download or save it again."
                )


def check_head_tensors(reader: WeightsReader, files: dict[str, str]) -> None:
    """Refuses a value head that would load as a broken one: a tensor that is not floating point (float16 and
    bfloat16 are fine: they are cast to the head's float32), or that holds NaN or infinity. The head's tensors are
    tiny and read whole; the base model's weights are not scanned.

    Args:
        reader: the reader the checkpoint's files were read with.
        files: the checkpoint's name of each head tensor, with the file that holds it.

    Raises:
        CorruptCheckpointError: names the file, the tensor and what to do.
    """
    for key, file in files.items():
        info = reader.info(file, key)
        if not info.is_floating_point:
            raise CorruptCheckpointError(
                f"{file} holds the value head's `{key}` as {info.dtype}, but a value head's weights are floating point "
                "(float32, or float16 / bfloat16, which are cast): the file is corrupt or was not written for this "
                "head. Load an earlier checkpoint, or the base model's weights for a fresh head."
            )
    for file in dict.fromkeys(files.values()):
        names = [key for key, holder in files.items() if holder == file]
        for key, tensor in reader.tensors(file, names).items():
            finite = torch.isfinite(tensor.float())
            if not finite.all():
                raise CorruptCheckpointError(
                    f"{file} holds NaN or infinity in the value head's `{key}` ({int((~finite).sum())} of "
                    f"{finite.numel()} values): the training that wrote it diverged, or the file is corrupt. Load an "
                    "earlier checkpoint, or the base model's weights for a fresh head."
                )


def _head_file_beside(
    path_or_id: str, hub_kwargs: dict, layout: str, reader: WeightsReader | None = None
) -> CheckpointHead | None:
    """The first of `ADAPTER_HEAD_NAMES` beside a model or adapter that holds a value head, as a separate file (its
    `v_head.*` tensors checked with [`check_head_tensors`])."""
    reader = reader or WeightsReader()
    for name in ADAPTER_HEAD_NAMES:
        resolved = resolve_file(path_or_id, name, hub_kwargs)
        if resolved is None:
            continue
        keys = reader.keys(resolved)
        shapes = {key: reader.info(resolved, key).shape for key in (HEAD_WEIGHT_KEY, HEAD_BIAS_KEY) if key in keys}
        if shapes:
            check_head_tensors(reader, {key: resolved for key in keys if key.startswith("v_head.")})
            return CheckpointHead(resolved, shapes, layout=layout, separate_file=True)
    return None


def find_adapter_value_head(path_or_id: str | os.PathLike, hub_kwargs: dict) -> CheckpointHead | None:
    """Finds the value head saved next to a PEFT adapter: `value_head.safetensors` (ours, LLaMA-Factory's),
    `value_head.bin` (LLaMA-Factory's), or a `pytorch_model.bin` / `model.safetensors` holding `v_head.*` (TRL's).

    Returns:
        The file and its head tensors' shapes, or `None` when the adapter was saved without a head.
    """
    path_or_id = str(path_or_id)
    ours = read_config_dict(path_or_id, hub_kwargs).get("model_type", "").startswith("transformers-vhead")
    head = _head_file_beside(path_or_id, hub_kwargs, "transformers-vhead" if ours else "LLaMA-Factory")
    if head is not None:
        return head
    head = find_value_head(path_or_id, hub_kwargs)
    return head if head is not None and head.layout in ("TRL", "transformers-vhead") else None


# Files a checkpoint directory can hold that say nothing about a model (git and hub bookkeeping, cards, licences).
_NOT_MODEL_FILES = (".gitattributes", "README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md")
# transformers' weight files, with or without a variant or shard number, and the ones of the layouts we read.
_WEIGHT_FILE_PATTERN = re.compile(
    r"^(model|pytorch_model|adapter_model|value_head)([.-].*)?\.(safetensors|bin)(\.index\.json)?$|\.gguf$"
)


def check_model_source(path_or_id: str | os.PathLike, hub_kwargs: dict) -> None:
    """Fails early, with a message that says what to do, when `path_or_id` cannot hold a model we load.

    A local directory must hold a `config.json` (or a PEFT `adapter_config.json`) and weights that transformers reads;
    a hub id, while downloads are off, must be in the hub cache. Anything else is left to transformers.

    Raises:
        NoModelFoundError: the path does not exist, or the directory holds no model files at all.
        UnrecognizedLayoutError: the directory holds files, but in no layout we read (they are listed).
        NotInOfflineCacheError: a hub id with no copy in the cache while `HF_HUB_OFFLINE=1` or `local_files_only`.
    """
    subfolder = hub_kwargs.get("subfolder")
    path = os.path.join(str(path_or_id), subfolder) if subfolder else str(path_or_id)
    if os.path.isdir(path):
        files = sorted(name for name in os.listdir(path) if not name.startswith("."))
        model_files = [name for name in files if name not in _NOT_MODEL_FILES]
        if not model_files:
            found = f" (only {', '.join(files)})" if files else ""
            raise NoModelFoundError(
                f"{path} holds no model{found}. Point to the directory that `save_pretrained` wrote, with its "
                "config.json and weights."
            )
        has_config = "config.json" in files or "adapter_config.json" in files
        has_weights = any(_WEIGHT_FILE_PATTERN.search(name) for name in files)
        if not (has_config and has_weights):
            missing = (
                "weights (model.safetensors, pytorch_model.bin or a sharded index)"
                if has_config
                else "config.json (or a PEFT adapter_config.json)"
            )
            raise UnrecognizedLayoutError(
                f"{path} is not a checkpoint layout we can read: it has no {missing}. Found: {', '.join(files)}. "
                "Layouts read: transformers-vhead, TRL, trlx, OpenRLHF, LLaMA-Factory, verl, DeepSpeed-Chat and "
                "transformers' own (save_pretrained), or a PEFT adapter."
            )
        return
    if os.path.exists(path):
        raise NoModelFoundError(f"{path} is a file, not a model directory: pass the directory that holds it.")
    try:
        validate_repo_id(str(path_or_id))
    except HFValidationError:
        raise NoModelFoundError(f"{path_or_id} does not exist, and it is not a hub id (`org/name`).") from None
    if not (is_offline_mode() or hub_kwargs.get("local_files_only")):
        return
    if any(resolve_file(str(path_or_id), name, hub_kwargs) for name in ("config.json", "adapter_config.json")):
        return
    why = "local_files_only=True" if hub_kwargs.get("local_files_only") else "HF_HUB_OFFLINE=1 is set"
    cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    raise NotInOfflineCacheError(
        f"{path_or_id} is not a local directory, and the hub cache at {cache} has no copy of it"
        f"{' at revision ' + hub_kwargs['revision'] if hub_kwargs.get('revision') else ''}; downloads are off "
        f"({why}). Download it where there is a network (`hf download {path_or_id}`) into this cache, or pass a "
        "local directory."
    )


def read_value_head(path: str) -> dict[str, torch.Tensor]:
    """The `v_head.*` tensors of a weights file, with the `v_head.` prefix stripped (the keys of `ValueHead`)."""
    tensors = read_tensors(path, lambda name: name.startswith("v_head."))
    return {name.removeprefix("v_head."): tensor for name, tensor in tensors.items()}
