"""`from_pretrained`: a source is described once, then the model is built from the description.

[`describe_source`] looks up each file of the source once (`sources.SourceFiles`) and reads each config once, into a
[`LoadPlan`]: where the base weights are, the config built from them, where the value head is and in which layout, the
adapter and the head saved beside it. [`load_pretrained`] then has transformers load the base weights from the plan's
local folder with the plan's config (so transformers looks nothing up again), checks them against the model from
transformers' own load report, puts in the head, the adapter and the reward adapter, and says where the head came from.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from .adapters import (
    KBIT_TRAINING_KEYWORDS,
    AdapterFiles,
    add_adapter,
    check_peft_config,
    find_adapter,
    load_adapter,
    share_quantization_state,
)
from .configuration import (
    HEAD_SETTINGS,
    VALUE_HEAD_MODEL_TYPES,
    ValueHeadConfig,
    explicit_head_settings,
    resolve_hidden_size,
)
from .errors import (
    CheckpointMismatchError,
    HeadShapeMismatchError,
    InvalidModelSourceError,
    RewardAdapterError,
)
from .layouts import (
    ADAPTER_HEAD_NAMES,
    HEAD_BIAS_KEY,
    HEAD_WEIGHT_KEY,
    HIDDEN_LAYER_PREFIX,
    CheckpointHead,
    HeadSource,
    find_adapter_value_head,
    find_value_head,
    layout_fields,
)
from .peft_support import is_peft_model, without_peft
from .placement import check_device_map
from .safe_reading import read_value_head
from .sources import GENERATION_CONFIG_NAME, HUB_KWARGS, SourceFiles, check_model_source, hub_kwargs_of

if TYPE_CHECKING:
    from .modeling import PreTrainedModelWrapper

logger = logging.get_logger(__name__)

# `from_pretrained` keywords transformers takes before it builds the config (the auto classes do the same): they are
# passed to its load, never set on the config.
_LOAD_ONLY_KWARGS = (
    *HUB_KWARGS,
    "dtype",
    "torch_dtype",
    "quantization_config",
    "trust_remote_code",
    "_from_auto",
    "_from_pipeline",
)


@dataclass(frozen=True)
class LoadPlan:
    """What a source is, found before anything is built: where each part of the model comes from."""

    source: str
    """The checkpoint as it was named, the model's `name_or_path`: the base model's, when the source is an adapter."""
    weights: SourceFiles | None
    """The base model's files; `None` when transformers finds the weights itself (a `state_dict`, a GGUF file)."""
    config: ValueHeadConfig | None
    """The config, read once, with the caller's settings and the head settings the layout implies."""
    load_kwargs: dict[str, Any]
    """The keywords of transformers' load (the config's own are in `config`)."""
    head: CheckpointHead | None = None
    """The value head among (or beside) the base weights, its layout and the key mapping that loads it."""
    adapter: AdapterFiles | None = None
    adapter_head: CheckpointHead | None = None
    """The value head saved next to the adapter, which replaces the base's."""
    generation_config_file: str | None = None
    """The generation config saved next to the adapter (the policy's), which replaces the base model's."""


def describe_source(
    model_class: type[PreTrainedModelWrapper], source: str | os.PathLike, kwargs: dict[str, Any]
) -> LoadPlan:
    """The [`LoadPlan`] of `source` (a directory or a hub id): each of its files looked up once, each config read
    once, every weights file the load reads checked (see `layouts.find_value_head`).

    Raises:
        NoModelFoundError, UnrecognizedLayoutError, NotInOfflineCacheError: see [`check_model_source`].
        InvalidModelSourceError: an adapter that names no base model.
        HeadShapeMismatchError, CorruptCheckpointError, UnsafePickleError, InvalidConfigError, AdapterNotFoundError,
            PeftConfigError: see [`PreTrainedModelWrapper.from_pretrained`].
    """
    if kwargs.get("state_dict") is not None or kwargs.get("gguf_file") is not None:
        # the weights come as tensors or a GGUF file, the config from it: transformers finds them
        return LoadPlan(str(source), None, None, kwargs)
    files = SourceFiles(source, hub_kwargs_of(kwargs))
    check_model_source(files, config_given=kwargs.get("config") is not None)
    adapter = find_adapter(files)
    if adapter is None:
        return _describe_checkpoint(model_class, files, kwargs)
    base = adapter.peft_config.base_model_name_or_path
    if not base:
        raise InvalidModelSourceError(
            f"The adapter at {source} names no base model (base_model_name_or_path is empty in its "
            "adapter_config.json): load the base model, then `model.load_adapter(path)`."
        )
    # revision and subfolder name where the adapter is, not the base model
    base_kwargs = {key: value for key, value in kwargs.items() if key not in ("revision", "subfolder")}
    saved_by_us = isinstance(kwargs.get("config"), ValueHeadConfig)  # the auto classes pass the config saved there
    if not saved_by_us:
        base_kwargs = {**_saved_head_settings(files, model_class.config_class), **base_kwargs}
    plan = _describe_checkpoint(model_class, SourceFiles(base, hub_kwargs_of(base_kwargs)), base_kwargs)
    adapter_head = _adapter_value_head(files, plan.config, saved_by_us)
    generation_config_file = files.find(GENERATION_CONFIG_NAME)
    return replace(plan, adapter=adapter, adapter_head=adapter_head, generation_config_file=generation_config_file)


def _describe_checkpoint(
    model_class: type[PreTrainedModelWrapper], files: SourceFiles, kwargs: dict[str, Any]
) -> LoadPlan:
    """The plan of a model checkpoint (no adapter): its config, built once as the auto classes build it, and its
    head."""
    given = kwargs.get("config")
    if isinstance(given, ValueHeadConfig):
        config, load_kwargs = given, {key: value for key, value in kwargs.items() if key != "config"}
    else:
        config, load_kwargs = _read_config(model_class.config_class, files, kwargs)
    lm_classes = model_class.transformers_parent_class._model_mapping  # remote-code models are not in it
    lm_class = lm_classes[type(config.text_config)] if type(config.text_config) in lm_classes else None
    head = find_value_head(
        files,
        layout_fields(config),
        kwargs.get("variant"),
        kwargs.get("use_safetensors"),
        getattr(lm_class, "base_model_prefix", None),  # where DeepSpeed-Chat's backbone goes
    )
    if head is not None:
        config = _with_layout_settings(config, head, None if isinstance(given, ValueHeadConfig) else kwargs)
        _check_head_shape(head, config.text_config, config.v_head_hidden_size)
    if not files.is_local:
        files.find(GENERATION_CONFIG_NAME)  # transformers reads it from the snapshot folder, which must hold it
    return LoadPlan(files.source, files, config, load_kwargs, head)


def _read_config(config_class: type[ValueHeadConfig], files: SourceFiles, kwargs: dict[str, Any]):
    """The config of `files` with the caller's settings applied, and the keywords left for transformers' load.

    As the auto classes split them: every keyword the config has is set on it (a setting of the wrapped model on
    `text_config`), except those transformers' load takes first (`_LOAD_ONLY_KWARGS`). The file found is read
    directly, so nothing is looked up twice."""
    held = {key: kwargs[key] for key in _LOAD_ONLY_KWARGS if key in kwargs}
    settings = {key: value for key, value in kwargs.items() if key not in held and key != "config"}
    given = kwargs.get("config")
    if given is not None:  # a path of another config
        where = {"pretrained_model_name_or_path": given, **files.hub_kwargs}
    elif (config_file := files.find("config.json")) is not None:
        where = {"pretrained_model_name_or_path": config_file, "name_or_path": files.source}
    else:  # transformers' own error for a source without a config
        where = {"pretrained_model_name_or_path": files.source, **files.hub_kwargs}
    config, unused = config_class.from_pretrained(**where, return_unused_kwargs=True, **settings)
    return config, {**held, **unused}


def _with_layout_settings(config: ValueHeadConfig, head: CheckpointHead, caller: dict | None) -> ValueHeadConfig:
    """The config with the settings `head`'s layout implies (trlx's MLP width and no dropout, OpenRLHF's reward
    statistics): over the file's, unless the caller's keywords set them (`caller`); a config the caller passed
    (`caller` is `None`) keeps every setting it has and is copied, not changed."""
    if caller is not None:
        for key, value in head.settings.items():
            if key not in caller:
                setattr(config, key, value)
        return config
    unset = {key: value for key, value in head.settings.items() if getattr(config, key) is None}
    if unset:
        config = copy.deepcopy(config)
        for key, value in unset.items():
            setattr(config, key, value)
    return config


def _adapter_value_head(files: SourceFiles, config: ValueHeadConfig, saved_by_us: bool) -> CheckpointHead | None:
    """The value head saved next to an adapter, checked against `config`, as a file of its own read after the load;
    `saved_by_us` when the adapter's `config.json` is known to be this package's, else that file says."""
    saved_by_us = saved_by_us or files.config_dict().get("model_type") in VALUE_HEAD_MODEL_TYPES
    head = find_adapter_value_head(files, saved_by_us)
    if head is None:
        return None
    _check_head_shape(head, config.text_config, config.v_head_hidden_size)
    return replace(head, separate_file=True)


def _saved_head_settings(files: SourceFiles, config_class: type[ValueHeadConfig]) -> dict[str, Any]:
    """The head's settings from a `config.json` this package saved next to an adapter (none for other adapters)."""
    saved = files.config_dict()
    if saved.get("model_type") != config_class.model_type:
        return {}
    config_class.from_dict(dict(saved), name_or_path=files.directory)  # a field of the wrong type names this file
    return {key: saved[key] for key in HEAD_SETTINGS if key in saved}


def _check_head_shape(head: CheckpointHead, text_config, hidden_layer_size: int | None = None) -> None:
    """Raises `HeadShapeMismatchError` unless the checkpoint's head fits a model of `text_config`."""
    width = resolve_hidden_size(text_config)
    expected = {HEAD_WEIGHT_KEY: (1, hidden_layer_size or width)}
    if hidden_layer_size is not None:
        expected[HIDDEN_LAYER_PREFIX + "weight"] = (hidden_layer_size, width)
    for key, shape in expected.items():
        found = head.shapes.get(key)
        if found != shape:
            raise HeadShapeMismatchError(
                f"{head.file} holds a value head ({head.layout} layout) whose {key} has shape {found}, but this "
                f"{text_config.model_type} model (hidden size {width}) needs {shape}: the head was trained for another "
                "base model. Load a checkpoint of this base model, or start from its plain weights for a fresh head."
            )


def load_pretrained(
    model_class: type[PreTrainedModelWrapper],
    source,
    model_args: tuple,
    kwargs: dict[str, Any],
    transformers_load: Callable[..., Any],
):
    """The whole of [`PreTrainedModelWrapper.from_pretrained`] (see its documentation).

    Args:
        transformers_load: `PreTrainedModel.from_pretrained` bound to `model_class`, which loads the weights.
    """
    peft_config = kwargs.pop("peft_config", None)
    is_trainable = kwargs.pop("is_trainable", False)
    reward_adapter = kwargs.pop("reward_adapter", None)
    reward_adapter_name = kwargs.pop("reward_adapter_name", "reward_adapter")
    kwargs = explicit_head_settings(kwargs)
    kwargs.pop("adapter_kwargs", None)  # the auto classes pass the adapter they found; the plan finds it again
    kbit_training = {key: kwargs.pop(key) for key in KBIT_TRAINING_KEYWORDS if key in kwargs}  # TRL's
    if peft_config is not None:
        check_peft_config(peft_config)
    if "device_map" in kwargs:  # a dict is copied: the head's entry may be adjusted in it while loading
        kwargs["device_map"] = check_device_map(kwargs["device_map"], model_class.__name__)
    if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
        raise RewardAdapterError(
            f"reward_adapter must be a local path or a hub id of a saved reward adapter, got "
            f"{type(reward_adapter).__name__}."
        )

    if isinstance(source, PreTrainedModel) or is_peft_model(source):
        loaded = model_class(source, **kwargs).train(source.training)  # the head follows the wrapped model's mode
    elif not isinstance(source, (str, os.PathLike)):
        raise InvalidModelSourceError(
            f"{model_class.__name__}.from_pretrained takes a local directory, a hub id or a transformers "
            f"PreTrainedModel, got {type(source).__name__}."
        )
    else:
        loaded = _build(describe_source(model_class, source, kwargs), model_args, is_trainable, transformers_load)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # `(model, loading_info)` with `output_loading_info`

    if peft_config is not None:
        if model.is_peft_model:
            logger.warning(
                f"peft_config is ignored: {source} already holds an adapter, which is loaded instead. Load the "
                "base model to train a fresh adapter."
            )
        else:
            model.pretrained_model = add_adapter(model.pretrained_model, peft_config, kbit_training=kbit_training)
    if reward_adapter is not None:
        model._attach_reward_adapter(reward_adapter, reward_adapter_name, kwargs)
    _report_head_source(model, source)
    return loaded


def _build(plan: LoadPlan, model_args: tuple, is_trainable: bool, transformers_load: Callable[..., Any]):
    """The model of `plan`: transformers loads the base weights (and the head, where the checkpoint holds it), then
    the head's file, the adapter and the head beside it are put in."""
    # transformers' own load report, always, to check the weights against the model (the caller gets it only if
    # asked); sizes that differ are reported rather than raised, so that the error can name them
    load_kwargs = {**plan.load_kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if plan.config is not None:
        load_kwargs["config"] = plan.config
    if plan.head is not None and plan.head.key_mapping:
        load_kwargs["key_mapping"] = {**plan.head.key_mapping, **(load_kwargs.get("key_mapping") or {})}
    folder = plan.source if plan.weights is None else plan.weights.directory
    model, loading_info = transformers_load(folder, *model_args, **load_kwargs)
    if folder != plan.source:  # a hub id loaded from its snapshot folder keeps its name
        model.name_or_path = model.config.name_or_path = plan.source
    missing_on_load = model.__dict__.pop("_missing_on_load", None)  # None: transformers skipped that step
    ignore_sizes = bool(plan.load_kwargs.get("ignore_mismatched_sizes"))
    _check_weights_fit(model, loading_info, missing_on_load, plan.head, plan.source, ignore_sizes)
    share_quantization_state(model, model.pretrained_model)  # before any adapter: peft reads it there
    if plan.head is not None:
        finish_head_load(model, plan.head)
    elif missing_on_load is not None and not _head_keys(model) & missing_on_load:
        # transformers loaded the whole head from the checkpoint although no layout of ours named it (the caller's
        # `key_mapping` did): it holds the saved tensors all the same
        model.v_head_source = HeadSource(file=str(plan.source))
    own_head_memory(model)
    if plan.adapter is not None:
        model.pretrained_model = load_adapter(model.pretrained_model, plan.adapter, "default", is_trainable)
        if plan.adapter_head is not None:
            finish_head_load(model, plan.adapter_head)
    if plan.generation_config_file is not None and model.can_generate():
        folder, name = os.path.split(plan.generation_config_file)
        model.generation_config = GenerationConfig.from_pretrained(folder, config_file_name=name)
    return (model, loading_info) if plan.load_kwargs.get("output_loading_info") else model


def load_adapter_value_head(model: PreTrainedModelWrapper, files: SourceFiles) -> None:
    """Loads the value head saved next to an adapter (`files`), if there is one."""
    head = _adapter_value_head(files, model.config, saved_by_us=False)
    if head is not None:
        finish_head_load(model, head)


def finish_head_load(model: PreTrainedModelWrapper, head: CheckpointHead) -> None:
    """After transformers' load: reads a head kept in a file of its own (which must hold exactly the head's
    tensors: `CheckpointMismatchError` otherwise), zeroes the bias a bias-free head (a sequence classifier's
    `score`) lacks, and records where the head came from."""
    if head.key_mapping:  # transformers keeps the mapping to save in the loaded layout again; we save our own
        model._weight_conversions = [
            conversion
            for conversion in getattr(model, "_weight_conversions", [])
            if not set(conversion._original_source_patterns) & set(head.key_mapping)
        ]
    with _whole_head(model.v_head):
        if head.separate_file:
            state_dict = read_value_head(head.file)
            _check_head_file_fits(model.v_head, state_dict, head.file)
            device = model.v_head.summary.weight.device
            model.v_head.load_state_dict({key: tensor.to(device) for key, tensor in state_dict.items()})
        elif not head.has_bias:
            with torch.no_grad():
                model.v_head.summary.bias.zero_()
    model.v_head_source = HeadSource(file=head.file, layout=head.layout)
    if not head.has_lm_head and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        logger.warning(
            f"{head.file} is a {head.layout} checkpoint, saved without an LM head: the LM head is freshly "
            "initialised, so the logits mean nothing. Use the model as a critic or reward model "
            "(`compute_values`, `compute_sequence_scores`), or load the policy's own checkpoint for generation."
        )


@torch.no_grad()
def own_head_memory(model: PreTrainedModelWrapper) -> None:
    """Gives the head's tensors memory of their own. Loaded ones are memory-mapped from the checkpoint, at an offset
    that may be unaligned, where BLAS can take another path and values differ from the saved model's by an ulp; the
    head is tiny, so a copy costs nothing. Parameters not materialised here (meta, ZeRO-3 shards) are left."""
    if is_deepspeed_zero3_enabled():
        return
    for parameter in model.v_head.parameters():
        if parameter.device.type != "meta":
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)


def _whole_head(head: nn.Module):
    """The head's full tensors for the block. Under ZeRO-3 its parameters are empty shards outside the block: every
    rank gathers them (every rank loads the model, so every rank is here), and rank 0's values are partitioned again
    after it. Parameters that are not DeepSpeed's (a model built before ZeRO-3 was on) are left as they are."""
    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0)


def _report_head_source(model: PreTrainedModelWrapper, source) -> None:
    if model.v_head_source.is_loaded or not isinstance(source, (str, os.PathLike)):
        logger.info(f"Value head of {type(model).__name__} {model.v_head_source}.")
        return
    logger.warning(
        f"Value head of {type(model).__name__} {model.v_head_source}: {source} holds no value head in any layout "
        f"we read (`v_head.*`, a `score` / `value_head` / `classifier` head, or {' / '.join(ADAPTER_HEAD_NAMES)} "
        "beside the model or its adapter). That is right when starting from a plain language model; to resume "
        "training, load a checkpoint saved with its value head."
    )


# Layouts whose head is always saved whole (weight and bias, and trlx's hidden layer): a tensor of it that did not load
# is a corrupt checkpoint. A classifier's `score` (and OpenRLHF's, DeepSpeed-Chat's) has no bias: it loads as zero.
_WHOLE_HEAD_LAYOUTS = ("transformers-vhead", "TRL", "trlx")
_OWN_PREFIXES = ("pretrained_model.", "v_head.")
_LISTED = 5  # keys of each kind an error lists


def _head_keys(model) -> set[str]:
    return {f"v_head.{key}" for key in model.v_head.state_dict()}


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _ignored(keys: set[str], patterns) -> set[str]:
    """The wrapped model's keys (named with our `pretrained_model.` prefix) that its own class says to ignore."""
    if not patterns:
        return set()
    pattern = re.compile("|".join(f"({pattern})" for pattern in patterns))
    return {key for key in keys if pattern.search(key.removeprefix("pretrained_model."))}


def _check_weights_fit(
    model,
    loading_info: dict,
    missing_on_load: set[str] | None,
    head: CheckpointHead | None,
    source,
    ignore_mismatched_sizes: bool,
) -> None:
    """Raises `CheckpointMismatchError` when the weights transformers loaded do not fit the model the config built.

    Read from transformers' own load report (no file is read again):
    - in every layout: none of the wrapped model's weights loaded (the config names another model than the weights
      are for), a tensor whose shape differs (unless `ignore_mismatched_sizes`), a head found in the checkpoint that
      did not load whole (`_WHOLE_HEAD_LAYOUTS`), or only part of one;
    - in our own layout (a head of ours found, or tensors named in our namespace left over): any tensor the model
      lacks, and any weight of the model the checkpoint lacks, except what the wrapped model's class says to ignore
      (transformers has already left out tied weights and buffers that are not saved).
    Other layouts keep transformers' behaviour: a classifier lacks its LM head, a trlx checkpoint holds a reference
    branch; the load report (and our warning) says so.
    """
    missing = set(loading_info["missing_keys"])
    unexpected = set(loading_info["unexpected_keys"])
    mismatched = {key: (tuple(saved), tuple(wanted)) for key, saved, wanted in loading_info["mismatched_keys"]}
    base = without_peft(model.pretrained_model)
    missing_base = {key for key in missing if key.startswith("pretrained_model.")}
    # listing the model's keys costs a walk over its modules: done only when some of its weights did not load
    base_keys = {f"pretrained_model.{key}" for key in base.state_dict()} if missing_base or mismatched else set()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    problems = []
    if base_keys and not base_keys - missing_base - set(mismatched) - tied:
        kind = f"{type(base).__name__} (model_type {base.config.model_type!r})"
        found = f"; the checkpoint holds {_listed(unexpected)} instead" if unexpected else ""
        raise CheckpointMismatchError(
            f"None of the weights of the {kind} that the config of {source} describes are in its checkpoint (it "
            f"lacks {_listed(missing_base)}{found}): the config names another model than the weights are for, or the "
            "weights are not this model's. Fix the model_type in config.json (text_config's, for a value-head "
            "model), or load the directory the weights were saved to."
        )
    if mismatched and not ignore_mismatched_sizes:
        shapes = {f"{key} (checkpoint {saved}, model {wanted})" for key, (saved, wanted) in mismatched.items()}
        problems.append(f"shapes that differ: {_listed(shapes)}")
    if missing_on_load is not None:
        head_missing = _head_keys(model) & missing_on_load
        if head is not None and not head.separate_file:
            may_lack = set() if head.layout in _WHOLE_HEAD_LAYOUTS or head.has_bias else {HEAD_BIAS_KEY}
            head_missing -= may_lack
        elif head_missing == _head_keys(model):
            head_missing = set()  # no head in the checkpoint: a fresh one (or one read from its own file)
        if head_missing:
            problems.append(f"value head tensors it lacks: {_listed(head_missing)}")
    own_layout = (head is not None and head.layout == "transformers-vhead") or any(
        key.startswith(_OWN_PREFIXES) for key in unexpected
    )
    if own_layout:
        unexpected -= _ignored(unexpected, base._keys_to_ignore_on_load_unexpected)
        missing = missing_base - _ignored(missing_base, base._keys_to_ignore_on_load_missing)
        if unexpected:
            problems.append(f"tensors the model does not have: {_listed(unexpected)}")
        if missing:
            problems.append(f"weights of the model it lacks: {_listed(missing)}")
    if problems:
        raise CheckpointMismatchError(
            f"The checkpoint at {source} does not fit the {type(base).__name__} its config describes: "
            f"{'; '.join(problems)}. A tensor was renamed, dropped, added or resized (a corrupt or hand-edited "
            "checkpoint), or config.json names another model than the weights are for. Restore the checkpoint and "
            "its config.json from a good copy, or save the model again."
        )


def _check_head_file_fits(v_head: nn.Module, state_dict: dict[str, torch.Tensor], file: str) -> None:
    """Raises `CheckpointMismatchError` unless a head read from a file of its own has exactly the head's tensors."""
    expected = v_head.state_dict()
    problems = []
    if lacking := set(expected) - set(state_dict):
        problems.append(f"it lacks {_listed(f'v_head.{key}' for key in lacking)}")
    if extra := set(state_dict) - set(expected):
        problems.append(f"the head has no {_listed(f'v_head.{key}' for key in extra)}")
    resized = {
        f"v_head.{key} (file {tuple(tensor.shape)}, model {tuple(expected[key].shape)})"
        for key, tensor in state_dict.items()
        if key in expected and tensor.shape != expected[key].shape
    }
    if resized:
        problems.append(f"shapes that differ: {_listed(resized)}")
    if problems:
        raise CheckpointMismatchError(
            f"The value head in {file} does not fit this model's head: {'; '.join(problems)}. The file is corrupt or "
            "was written for another head (e.g. with or without a hidden layer). Restore it from a good copy, or load "
            "the model without it for a fresh head."
        )
