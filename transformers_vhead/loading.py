"""Where a checkpoint keeps its value head, read safely.

transformers loads the weights; this module only finds which file holds the head (for the head's provenance and a clear
shape error before the load) and checks each safetensors file's header so a truncated file is named. Safetensors
headers are parsed by hand (a few KB, no tensor data); a pickle is only opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from transformers.utils import cached_file

from .errors import CorruptCheckpointError

HEAD_WEIGHT_KEY = "v_head.summary.weight"
HEAD_BIAS_KEY = "v_head.summary.bias"

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
    """The value head found in a checkpoint: its file and the shapes of its tensors."""

    file: str
    shapes: dict[str, tuple[int, ...]]


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


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header (`dtype`, `shape`, `data_offsets` per name).

    Raises:
        CorruptCheckpointError: the file is shorter or longer than its header says, or the header is not valid JSON.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CorruptCheckpointError(
                f"{path} is not a valid safetensors file (size {size} bytes, header length field {header_len}): "
                "it is truncated or corrupt. Save or download it again."
            )
        try:
            header = json.loads(file.read(header_len))
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path} has a corrupt safetensors header ({exc}). Save it again.") from exc
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    expected = 8 + header_len + max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if expected != size:
        raise CorruptCheckpointError(
            f"{path} is {size} bytes but its safetensors header describes {expected}: the file is truncated or "
            "corrupt. Save or download it again."
        )
    return tensors


def load_pickle_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped where the format allows, never unpickling anything but tensors.

    Raises:
        CorruptCheckpointError: the file cannot be read as a weights-only state dict.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format, which cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"Cannot read {path} as a weights-only PyTorch state dict: {exc}") from exc


def read_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file (from its header only) or a weights-only pickle."""
    if path.endswith(".safetensors"):
        return {name: tuple(entry["shape"]) for name, entry in read_safetensors_header(path).items()}
    return {name: tuple(tensor.shape) for name, tensor in load_pickle_state_dict(path).items()}


def read_tensors(path: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a weights-only pickle whose names `keep` accepts; a safetensors file
    reads only those."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys() if keep(name)}
    return {name: tensor for name, tensor in load_pickle_state_dict(path).items() if keep(name)}


def hub_kwargs_of(kwargs: dict) -> dict:
    """The keywords among `kwargs` that say where files come from (see `HUB_KWARGS`)."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def _head_shapes(path: str) -> dict[str, tuple[int, ...]]:
    shapes = read_tensor_shapes(path)
    return {name: shapes[name] for name in (HEAD_WEIGHT_KEY, HEAD_BIAS_KEY) if name in shapes}


def find_value_head(
    path_or_id: str | os.PathLike,
    hub_kwargs: dict,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> CheckpointHead | None:
    """Finds the value head in the checkpoint transformers will load from `path_or_id`.

    Looks at the same files as `PreTrainedModel.from_pretrained`, in its order. Every safetensors file of the checkpoint
    has its header checked, so a truncated shard is named here rather than failing deep inside the load.

    Args:
        path_or_id: a local directory or a hub id.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, `subfolder`, ... as for `cached_file`.
        variant: the weights variant (`model.<variant>.safetensors`).
        use_safetensors: `False` reads only pickles, `True` only safetensors, `None` prefers safetensors.

    Returns:
        The file holding `v_head.summary.weight` with the head tensors' shapes, or `None` if the checkpoint has no
        value head (a plain LM) or no weights at all.
    """
    path_or_id = str(path_or_id)
    names = []
    if use_safetensors is not False:
        names += SAFE_WEIGHTS_NAMES
    if not use_safetensors:
        names += PICKLE_WEIGHTS_NAMES
    for name in names:
        resolved = resolve_file(path_or_id, _with_variant(name, variant), hub_kwargs)
        if resolved is None:
            continue
        if not name.endswith(".json"):
            shapes = _head_shapes(resolved)
            return CheckpointHead(resolved, shapes) if shapes else None
        with open(resolved, encoding="utf-8") as index:
            weight_map = json.load(index)["weight_map"]
        shard_paths = {shard: resolve_file(path_or_id, shard, hub_kwargs) for shard in sorted(set(weight_map.values()))}
        for shard_path in shard_paths.values():
            if shard_path is not None and shard_path.endswith(".safetensors"):
                read_safetensors_header(shard_path)
        head_shard = shard_paths.get(weight_map.get(HEAD_WEIGHT_KEY))
        return CheckpointHead(head_shard, _head_shapes(head_shard)) if head_shard else None
    return None


def find_adapter_value_head(path_or_id: str | os.PathLike, hub_kwargs: dict) -> CheckpointHead | None:
    """Finds the value head saved next to a PEFT adapter: `value_head.safetensors` (ours, LLaMA-Factory's),
    `value_head.bin` (LLaMA-Factory's), or a `pytorch_model.bin` / `model.safetensors` holding `v_head.*` (TRL's).

    Returns:
        The file and its head tensors' shapes, or `None` when the adapter was saved without a head.
    """
    for name in ADAPTER_HEAD_NAMES:
        resolved = resolve_file(str(path_or_id), name, hub_kwargs)
        if resolved is not None:
            shapes = _head_shapes(resolved)
            return CheckpointHead(resolved, shapes) if shapes else None
    return find_value_head(path_or_id, hub_kwargs)


def read_value_head(path: str) -> dict[str, torch.Tensor]:
    """The `v_head.*` tensors of a weights file, with the `v_head.` prefix stripped (the keys of `ValueHead`)."""
    tensors = read_tensors(path, lambda name: name.startswith("v_head."))
    return {name.removeprefix("v_head."): tensor for name, tensor in tensors.items()}
