"""Reading weights files safely: what a load will read, read first, so that a bad file is named before transformers or
peft touch it.

Every safetensors header is validated by safetensors' own parser (the one transformers loads with; no tensor data is
read) and every pickle is memory-mapped with `torch.load(weights_only=True)`: a pickle that would run code is refused
and never unpickled, and it is disassembled (never run) to tell a hostile file from a corrupt one. Only named tensors
(a value head's, a reward head's) are read whole.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptCheckpointError, UnsafePickleError


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


def first_line(message: object, limit: int = 200) -> str:
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
        return first_line(paragraphs[-2])
    return first_line(error)


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
    whole), a pickle memory-mapped (its tensors kept, for the head's values). The shape and dtype of every tensor are
    kept from that one read; only the head's data is read. Dropped when the look-up ends, before the load."""

    def __init__(self):
        self._infos: dict[str, dict[str, TensorInfo]] = {}
        self._pickles: dict[str, dict[str, torch.Tensor]] = {}

    def _read(self, path: str) -> dict[str, TensorInfo]:
        if path not in self._infos:
            if path.endswith(".safetensors"):
                self._infos[path] = read_safetensors_header(path)
            else:
                self._pickles[path] = load_pickle_state_dict(path)
                self._infos[path] = {name: _pickle_info(tensor) for name, tensor in self._pickles[path].items()}
        return self._infos[path]

    def keys(self, path: str) -> Collection[str]:
        """The names of the tensors in `path`, in its order (the file is checked, see [`read_safetensors_header`] and
        [`load_pickle_state_dict`])."""
        return self._read(path).keys()

    def not_floating(self, path: str) -> list[str]:
        """The tensors of `path` whose dtype is not floating point (integers, bool)."""
        return [name for name, info in self._read(path).items() if not info.is_floating_point]

    def info(self, path: str, name: str) -> TensorInfo:
        """The shape and dtype of tensor `name` of `path`."""
        return self._read(path)[name]

    def tensors(self, path: str, names: Collection[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` of `path` (a safetensors file reads only those)."""
        if path in self._pickles:
            return {name: self._pickles[path][name] for name in names}
        with _open_safetensors(path) as file:
            return {name: file.get_tensor(name) for name in names}


def read_value_head(path: str) -> dict[str, torch.Tensor]:
    """The `v_head.*` tensors of a weights file, with the `v_head.` prefix stripped (the keys of `ValueHead`)."""
    tensors = read_tensors(path, lambda name: name.startswith("v_head."))
    return {name.removeprefix("v_head."): tensor for name, tensor in tensors.items()}
