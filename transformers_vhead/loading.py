"""Where a checkpoint keeps its value head, read safely.

transformers loads the weights; this module only finds which file holds the head (for the head's provenance and a clear
shape error before the load) and checks each safetensors file's header so a truncated file is named. Safetensors
headers are parsed by hand (a few KB, no tensor data); a pickle is only opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers.utils import cached_file

from .errors import (
    CorruptCheckpointError,
    NoModelFoundError,
    NotInOfflineCacheError,
    UnrecognizedLayoutError,
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


def read_config_dict(path_or_id: str, hub_kwargs: dict) -> dict[str, Any]:
    """The `config.json` of a directory or hub id as a dict (`{}` when there is none)."""
    resolved = resolve_file(str(path_or_id), "config.json", hub_kwargs)
    if resolved is None:
        return {}
    with open(resolved, encoding="utf-8") as file:
        return json.load(file)


def checkpoint_tensor_files(
    path_or_id: str | os.PathLike,
    hub_kwargs: dict,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> dict[str, str] | None:
    """The name of every tensor in the checkpoint transformers will load from `path_or_id`, with the local file that
    holds it; `None` when there are no weights.

    Looks at the same files as `PreTrainedModel.from_pretrained`, in its order. Every safetensors file has its header
    checked, so a truncated shard is named here rather than failing deep inside the load; only headers are read (a
    single pickle is read whole, memory-mapped).

    Args:
        path_or_id: a local directory or a hub id.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, `subfolder`, ... as for `cached_file`.
        variant: the weights variant (`model.<variant>.safetensors`).
        use_safetensors: `False` reads only pickles, `True` only safetensors, `None` prefers safetensors.
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
            return dict.fromkeys(read_tensor_shapes(resolved), resolved)
        with open(resolved, encoding="utf-8") as index:
            weight_map = json.load(index)["weight_map"]
        shard_paths = {shard: resolve_file(path_or_id, shard, hub_kwargs) for shard in sorted(set(weight_map.values()))}
        for shard_path in shard_paths.values():
            if shard_path is not None and shard_path.endswith(".safetensors"):
                read_safetensors_header(shard_path)
        return {key: shard_paths[shard] for key, shard in weight_map.items() if shard_paths[shard] is not None}
    return None


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
    """
    path_or_id = str(path_or_id)
    files = checkpoint_tensor_files(path_or_id, hub_kwargs, variant, use_safetensors)
    if files:
        config = read_config_dict(path_or_id, hub_kwargs)
        match = match_head(files.keys(), config, lm_prefix)
        if match is not None:
            file_shapes = {file: read_tensor_shapes(file) for file in {files[key] for key in match.head_keys}}
            shapes = {ours: file_shapes[files[key]][key] for key, ours in match.head_keys.items()}
            key_mapping = {rf"^{re.escape(key)}$": ours for key, ours in match.head_keys.items() if key != ours}
            return CheckpointHead(
                file=files[next(key for key, ours in match.head_keys.items() if ours == HEAD_WEIGHT_KEY)],
                shapes=shapes,
                layout=match.layout,
                key_mapping={**match.prefix_mapping, **key_mapping},
                settings=_layout_settings(match, shapes, config),
                has_lm_head=match.has_lm_head,
            )
    return _head_file_beside(path_or_id, hub_kwargs, "LLaMA-Factory")  # kept out of the model's own checkpoint


def _head_file_beside(path_or_id: str, hub_kwargs: dict, layout: str) -> CheckpointHead | None:
    """The first of `ADAPTER_HEAD_NAMES` beside a model or adapter that holds a value head, as a separate file."""
    for name in ADAPTER_HEAD_NAMES:
        resolved = resolve_file(path_or_id, name, hub_kwargs)
        if resolved is not None and (shapes := _head_shapes(resolved)):
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
