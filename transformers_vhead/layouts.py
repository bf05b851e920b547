"""Where a checkpoint keeps its value head, in whichever writer's layout it was saved.

The layouts read: ours and TRL's (`v_head.summary.*`), trlx (an MLP `v_head.{0,2}.*`), DeepSpeed-Chat
(`rwtransformer.*` and `v_head.weight`), OpenRLHF (`<value_head_prefix>.weight`, reward statistics in the config),
transformers' sequence and token classifiers (`score` / `classifier`), and LLaMA-Factory (`value_head.safetensors` /
`value_head.bin` beside an ordinary checkpoint). A layout is told from the tensor names (read from the headers, see
`safe_reading`) and a few fields of the config; the head's own tensors are checked before the load.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnrecognizedLayoutError
from .safe_reading import WeightsReader
from .sources import SourceFiles, checkpoint_tensor_files

HEAD_WEIGHT_KEY = "v_head.summary.weight"
HEAD_BIAS_KEY = "v_head.summary.bias"
HIDDEN_LAYER_PREFIX = "v_head.hidden_layer."  # the optional MLP layer before `summary` (trlx's heads)


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


# The fields of a config that say where and how a checkpoint keeps its head, and which weights it loads.
LAYOUT_FIELDS = (
    "architectures",
    "value_head_prefix",
    "normalize_reward",
    "mean",
    "std",
    "quantization_config",
    "transformers_weights",
)


def layout_fields(config: Any) -> dict[str, Any]:
    """The `LAYOUT_FIELDS` a config sets, from the config object built from `config.json` (so the file is not read
    again) or from a dict of it: its own, else its `text_config`'s (a plain checkpoint's config became the wrapped
    model's)."""
    inner = config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)
    fields = {}
    for name in LAYOUT_FIELDS:
        for holder in (config, inner):
            value = holder.get(name) if isinstance(holder, dict) else getattr(holder, name, None)
            if value is not None:
                fields[name] = value
                break
    return fields


def find_value_head(
    files: SourceFiles,
    fields: dict[str, Any],
    variant: str | None = None,
    use_safetensors: bool | None = None,
    lm_prefix: str | None = None,
) -> CheckpointHead | None:
    """Finds the value head of the checkpoint transformers will load from `files`, in any layout we read.

    Layouts (see `match_head`): ours and TRL's (`v_head.summary.*` among the model's keys, in one file or one shard),
    trlx (`base_model.*` and an MLP `v_head.{0,2}.*`), DeepSpeed-Chat (`rwtransformer.*` and `v_head.weight`),
    OpenRLHF (`<value_head_prefix>.weight`, `score.weight` or `value_head.weight`, reward statistics in the config),
    transformers' sequence classification (`score.weight`, no bias) and token classification (verl's critic:
    `score` or `classifier` with a bias), and LLaMA-Factory (`value_head.safetensors` / `value_head.bin` beside an
    ordinary checkpoint).

    Args:
        files: the checkpoint's files.
        fields: its config's [`layout_fields`].
        variant, use_safetensors: as for `checkpoint_tensor_files`.
        lm_prefix: the `base_model_prefix` of the language model the checkpoint holds.

    Returns:
        The head's file, shapes (in our key names), layout, the key mapping and settings that load it; `None` when the
        checkpoint has no value head (a plain LM) or no weights at all.

    Raises:
        CorruptCheckpointError: a weights file or index is corrupt (see [`checkpoint_tensor_files`]), or the head's
            tensors are not floating point or hold NaN or infinity (see [`check_head_tensors`]).
        UnsafePickleError: a pickle the load would read would run code.
    """
    reader = WeightsReader()
    weights_name = fields.get("transformers_weights")  # the file transformers loads instead of its usual names
    weights_name = weights_name if isinstance(weights_name, str) and weights_name else None
    tensor_files = checkpoint_tensor_files(files, variant, use_safetensors, weights_name, reader)
    if tensor_files:
        match = match_head(tensor_files.keys(), fields, lm_prefix)
        if match is not None:
            check_head_tensors(reader, {key: tensor_files[key] for key in match.head_keys})  # first: plainer message
        check_weight_dtypes(reader, tensor_files, fields)
        if match is not None:
            shapes = {ours: reader.info(tensor_files[key], key).shape for key, ours in match.head_keys.items()}
            key_mapping = {rf"^{re.escape(key)}$": ours for key, ours in match.head_keys.items() if key != ours}
            return CheckpointHead(
                file=tensor_files[next(key for key, ours in match.head_keys.items() if ours == HEAD_WEIGHT_KEY)],
                shapes=shapes,
                layout=match.layout,
                key_mapping={**match.prefix_mapping, **key_mapping},
                settings=_layout_settings(match, shapes, fields),
                has_lm_head=match.has_lm_head,
            )
    return _head_file_beside(files, "LLaMA-Factory", reader)  # kept out of the model's checkpoint


def check_weight_dtypes(reader: WeightsReader, files: dict[str, str], fields: dict[str, Any]) -> None:
    """Refuses a `*.weight` tensor of an integer or bool dtype in a checkpoint whose `config.json` declares no
    quantization: a header whose `F32` became `I32` (one byte) describes a valid file, whose bytes transformers would
    cast to garbage values without a word. (Biases and buffers are left alone: old GPT-2 checkpoints keep a bool
    `attn.bias` mask.) Only the dtypes already read with the headers are looked at.

    Raises:
        CorruptCheckpointError: names the file and the tensor.
    """
    if "quantization_config" in fields:
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


def _head_file_beside(files: SourceFiles, layout: str, reader: WeightsReader | None = None) -> CheckpointHead | None:
    """The first of `ADAPTER_HEAD_NAMES` beside a model or adapter that holds a value head, as a separate file (its
    `v_head.*` tensors checked with [`check_head_tensors`])."""
    reader = reader or WeightsReader()
    for name in ADAPTER_HEAD_NAMES:
        resolved = files.find(name)
        if resolved is None:
            continue
        keys = reader.keys(resolved)
        shapes = {key: reader.info(resolved, key).shape for key in (HEAD_WEIGHT_KEY, HEAD_BIAS_KEY) if key in keys}
        if shapes:
            check_head_tensors(reader, {key: resolved for key in keys if key.startswith("v_head.")})
            return CheckpointHead(resolved, shapes, layout=layout, separate_file=True)
    return None


def find_adapter_value_head(files: SourceFiles, saved_by_us: bool) -> CheckpointHead | None:
    """Finds the value head saved next to a PEFT adapter: `value_head.safetensors` (ours, LLaMA-Factory's),
    `value_head.bin` (LLaMA-Factory's), or a `pytorch_model.bin` / `model.safetensors` holding `v_head.*` (TRL's).

    Args:
        files: the adapter's files.
        saved_by_us: the adapter's `config.json` is this package's (its head is then in our layout).

    Returns:
        The file and its head tensors' shapes, or `None` when the adapter was saved without a head.
    """
    head = _head_file_beside(files, "transformers-vhead" if saved_by_us else "LLaMA-Factory")
    if head is not None:
        return head
    head = find_value_head(files, layout_fields(files.config_dict()))
    return head if head is not None and head.layout in ("TRL", "transformers-vhead") else None
