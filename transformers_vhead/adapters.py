"""PEFT adapters on the wrapped language model: adding and loading them with checks, and switching them without side
effects.

A value-head model with adapters always holds its language model as a `peft.PeftModel` (TRL's layout: TRL code calls
`model.pretrained_model.disable_adapter()`), whichever way the adapter came: `peft_config=`, a `PeftModel` instance, an
adapter directory, or transformers' adapter API on the value-head model. Adapter weights are therefore named relative
to the language model, and a saved policy adapter is an ordinary adapter of the base model.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import AdapterMismatchError, AdapterNotFoundError, PeftConfigError
from .peft_support import is_peft_config, is_peft_model, require_peft, without_peft
from .safe_reading import read_tensor_shapes
from .sources import SourceFiles

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names, safetensors first
PEFT_KEY_PREFIX = "base_model.model."  # what peft puts before the language model's own parameter names
# `from_pretrained`'s keywords for `peft.prepare_model_for_kbit_training`, which TRL took out of the loading keywords
KBIT_TRAINING_KEYWORDS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs", "auto_clear_cache")
# what transformers' quantizers set on the model they load, and peft reads on the model it adapts
QUANTIZATION_ATTRIBUTES = (
    "is_loaded_in_8bit",
    "is_loaded_in_4bit",
    "quantization_method",
    "is_quantized",
    "hf_quantizer",
)

_PROMPT_LEARNING_REASON = (
    "prompt-learning adapters (prompt tuning, prefix tuning, p-tuning) prepend virtual tokens, so the hidden states no "
    "longer line up with input_ids and the value of each token would be misplaced; TRL rejects them for the same "
    "reason. Use LoRA or another adapter that changes the layers (IA3, LoHa, ...)."
)


def check_peft_config(peft_config: object) -> PeftConfig:
    """Returns `peft_config` if it can configure a value-head policy.

    Raises:
        PeftConfigError: it is not a `peft.PeftConfig`, or it is a prompt-learning config.
    """
    if not is_peft_config(peft_config):
        raise PeftConfigError(
            f"peft_config must be a peft.PeftConfig such as peft.LoraConfig(...), got {type(peft_config).__name__}."
        )
    if peft_config.is_prompt_learning:
        raise PeftConfigError(f"{type(peft_config).__name__} is not supported: {_PROMPT_LEARNING_REASON}")
    return peft_config


def check_language_model(model: nn.Module) -> None:
    """Rejects the language models a value head cannot wrap with its adapters kept.

    Raises:
        PeftConfigError: a `PeftModel` with a prompt-learning adapter, or a model whose adapters transformers injected
            in place (`model.load_adapter(...)` on the bare model), which would be saved as full weights.
    """
    if is_peft_model(model):
        for config in model.peft_config.values():
            check_peft_config(config)
    elif getattr(model, "_hf_peft_config_loaded", False):
        raise PeftConfigError(
            f"This {type(model).__name__} has adapters loaded in place by transformers, which a value-head model "
            "cannot save with its head. Wrap the bare model and call `load_adapter` / `add_adapter` on the value-head "
            "model, or wrap a peft.PeftModel."
        )


def add_adapter(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", kbit_training: dict | None = None
) -> PeftModel:
    """Adds a fresh, trainable adapter to `model`, wrapping it in a `PeftModel` first if it is not one.

    Args:
        kbit_training: `from_pretrained`'s route (TRL's): a model loaded in 8 or 4 bits (bitsandbytes) is first
            prepared with `peft.prepare_model_for_kbit_training(model, **kbit_training)` (base frozen, non-quantized
            weights upcast to fp32, gradient checkpointing on unless `use_gradient_checkpointing=False`). `None`: never
            (transformers' `add_adapter` does not prepare either).
    """
    check_peft_config(peft_config)
    if is_peft_model(model):
        model.add_adapter(adapter_name, peft_config)
        return model
    peft = require_peft("Adding a PEFT adapter")
    if kbit_training is not None and is_loaded_in_kbit(model):
        accepted = inspect.signature(peft.prepare_model_for_kbit_training).parameters
        model = peft.prepare_model_for_kbit_training(
            model, **{key: value for key, value in kbit_training.items() if key in accepted}
        )
    return peft.get_peft_model(model, peft_config, adapter_name=adapter_name)


def is_loaded_in_kbit(model: nn.Module) -> bool:
    """Whether `model` was loaded in 8 or 4 bits by bitsandbytes: the attributes TRL and peft read."""
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def share_quantization_state(wrapper: nn.Module, language_model: nn.Module) -> None:
    """Copies the quantization attributes transformers sets on the model it loads (here the value-head model) to the
    wrapped language model, where peft reads them: `prepare_model_for_kbit_training`, and the LoRA layers chosen for
    bitsandbytes' `Linear8bitLt` / `Linear4bit`, look at the model they are given."""
    for name in QUANTIZATION_ATTRIBUTES:
        if name in vars(wrapper) and name not in vars(language_model):
            setattr(language_model, name, getattr(wrapper, name))


@dataclass(frozen=True)
class AdapterFiles:
    """A saved PEFT adapter, found once: peft then reads it from `directory` and is handed its config."""

    source: str
    """The adapter as it was named: a directory or a hub id."""
    directory: str
    """The local folder of its `adapter_config.json` (the hub snapshot's for a hub id)."""
    weights_file: str
    peft_config: PeftConfig
    """Its `adapter_config.json`, read once."""

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of the weights file, read once, when first asked for (see
        [`read_tensor_shapes`])."""
        return read_tensor_shapes(self.weights_file)


def find_adapter(files: SourceFiles) -> AdapterFiles | None:
    """The adapter of a source (`None` when it holds no `adapter_config.json`), its config read and checked.

    Raises:
        AdapterNotFoundError: there is an adapter config but no adapter weights next to it.
        PeftConfigError: the adapter is prompt learning (see [`check_peft_config`]).
    """
    config_file = files.find(ADAPTER_CONFIG_NAME)
    if config_file is None:
        return None
    weights_file = next(filter(None, map(files.find, ADAPTER_WEIGHTS_NAMES)), None)
    if weights_file is None:
        raise AdapterNotFoundError(
            f"{files.source} has an {ADAPTER_CONFIG_NAME} but no adapter weights "
            f"({' or '.join(ADAPTER_WEIGHTS_NAMES)}): the adapter was not saved completely. Save it again with "
            "`save_pretrained`."
        )
    directory = os.path.dirname(config_file)  # local, or the hub cache's snapshot: peft looks nothing up again
    peft_config = require_peft(f"Loading the PEFT adapter at {files.source}").PeftConfig.from_pretrained(directory)
    return AdapterFiles(files.source, directory, weights_file, check_peft_config(peft_config))


def require_adapter(files: SourceFiles) -> AdapterFiles:
    """As [`find_adapter`], but a source without an adapter is an error.

    Raises:
        AdapterNotFoundError: the source holds no adapter (names what was looked for).
    """
    model_id = files.source
    try:
        found = find_adapter(files)
    except AdapterNotFoundError:
        raise
    except OSError as exc:  # neither an existing directory nor a valid hub id
        raise AdapterNotFoundError(f"{model_id} holds no PEFT adapter: {exc}") from exc
    if found is None:
        raise AdapterNotFoundError(
            f"{model_id} holds no PEFT adapter: no {ADAPTER_CONFIG_NAME} was found there (nor in the hub cache). "
            "Pass the directory or hub id that `PeftModel.save_pretrained` wrote."
        )
    return found


def _linear_features(layer: nn.Module) -> tuple[int, int] | None:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):  # GPT-2 style: the weight is stored (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    return None


def check_adapter_fits(model: nn.Module, weights_file: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Checks, before anything is loaded, that each LoRA matrix in `weights_file` fits the layer it adapts.

    Args:
        model: the language model (a `PeftModel` or the bare model).
        weights_file: the adapter's weights file, named in the error.
        shapes: its tensors' shapes (see [`read_tensor_shapes`]).

    Raises:
        AdapterMismatchError: a matrix targets a layer this model lacks, or its shape does not fit (the adapter was
            trained for another base model).
    """
    base = without_peft(model)
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_path = key.removeprefix(PEFT_KEY_PREFIX).split(".lora_")[0]
        try:
            layer = base.get_submodule(module_path)
        except AttributeError:
            raise AdapterMismatchError(
                f"{weights_file} adapts `{module_path}`, which this {type(base).__name__} does not have: the adapter "
                "was trained for another base model. Load it onto the base model it was trained on."
            ) from None
        features = _linear_features(getattr(layer, "base_layer", layer))
        if features is None or len(shape) != 2:
            continue
        in_features, out_features = features
        fits = shape[1] == in_features if ".lora_A." in key else shape[0] == out_features
        if not fits:
            raise AdapterMismatchError(
                f"{weights_file} holds {key} of shape {shape}, which does not fit `{module_path}` "
                f"(in_features={in_features}, out_features={out_features}) of this {type(base).__name__}: the "
                "adapter was trained for another base model. Load it onto the base model it was trained on."
            )


def load_adapter(
    model: nn.Module, adapter: AdapterFiles, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Loads a saved adapter onto `model` (wrapping it in a `PeftModel` first if it is not one), after checking that it
    fits, so a mismatched adapter leaves the model untouched. The weights file peft will read is read by us first (a
    safetensors header, or a pickle memory-mapped with `weights_only=True`), so a corrupt or hostile file is refused
    with our error before peft opens it. peft gets the config already read, as its own `PeftModel.from_pretrained`
    hands it on.

    Args:
        model: the language model.
        adapter: the adapter (see [`find_adapter`]).
        adapter_name: the name the adapter gets.
        is_trainable: `False` (TRL's and peft's default) loads it frozen.

    Raises:
        AdapterMismatchError: see [`check_adapter_fits`].
        UnsafePickleError: `adapter_model.bin` would run code when unpickled (it is not unpickled).
        CorruptCheckpointError: the adapter's weights file is truncated or corrupt.
    """
    peft = require_peft(f"Loading the PEFT adapter at {adapter.source}")
    check_adapter_fits(model, adapter.weights_file, adapter.shapes)
    peft_config = copy.deepcopy(adapter.peft_config)  # peft sets `inference_mode` on it
    if not is_peft_model(model):
        return peft.PeftModel.from_pretrained(
            model, adapter.directory, adapter_name=adapter_name, is_trainable=is_trainable, config=peft_config
        )
    # peft's own order (`PeftModel.from_pretrained`): the adapter from its config, then its weights into it
    peft_config.inference_mode = not is_trainable
    model.add_adapter(adapter_name, peft_config)
    if is_trainable:
        model.set_requires_grad(adapter_name)
    model.load_adapter(adapter.directory, adapter_name, is_trainable=is_trainable)
    return model


def _tuner_layers(model: PeftModel) -> list[BaseTunerLayer]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # imported already: `model` is a PeftModel

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def switched_adapter(model: PeftModel, adapter_name: str | None) -> Iterator[None]:
    """Within the block, only `adapter_name` is active (with `None`, every adapter is off: the base model).

    On exit, also when the block raises, the active adapter, whether adapters were enabled, and every parameter's
    `requires_grad` are as before (peft's `set_adapter` would otherwise make the adapter it activates trainable).
    """
    tuner = model.base_model
    previous = tuner.active_adapter
    was_enabled = any(not layer.disable_adapters for layer in _tuner_layers(model))
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        if adapter_name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.set_adapter(adapter_name)
            tuner.enable_adapter_layers()
        yield
    finally:
        tuner.set_adapter(previous)
        if was_enabled:
            tuner.enable_adapter_layers()
        else:
            tuner.disable_adapter_layers()
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@torch.no_grad()
def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    """Adds adapter `target` as a frozen copy of adapter `source` (same config, same weights).

    Raises:
        ValueError: `source` does not exist or `target` already does.
    """
    if source not in model.peft_config:
        raise ValueError(f"There is no adapter {source!r} to copy; the adapters are {list(model.peft_config)}.")
    if target in model.peft_config:
        raise ValueError(f"An adapter named {target!r} already exists; pick another name.")
    peft_config_class = require_peft("Copying an adapter").PeftConfig
    config = peft_config_class.from_peft_type(**model.peft_config[source].to_dict())
    with switched_adapter(model, source):  # add_adapter must not change which adapter is active or trainable
        model.add_adapter(target, config)
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        if f".{target}." in name:
            parameter.copy_(parameters[name.replace(f".{target}.", f".{source}.")])
            parameter.requires_grad_(False)


def _names(adapter_names: str | list[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


class AdapterMethods:
    """transformers' adapter API (`load_adapter`, `add_adapter`, `set_adapter`, `disable_adapters`, `enable_adapters`,
    `active_adapters`, `delete_adapter`) on a value-head model, plus the PPO reference through the adapters. Mixed into
    `PreTrainedModelWrapper`; every call acts on the wrapped language model as a `PeftModel`."""

    policy_adapter_name = "default"  # TRL's name for the policy's adapter
    rm_adapter_name: str | None = None
    ref_adapter_name: str | None = None

    def _peft_model(self) -> PeftModel:
        if not is_peft_model(self.pretrained_model):
            raise ValueError("No adapter loaded. Please load an adapter first.")  # transformers' message
        return self.pretrained_model

    def add_adapter(self, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
        """Adds a fresh adapter and activates it (trainable), as transformers' `add_adapter` does."""
        adapter_name = adapter_name or "default"
        self.pretrained_model = add_adapter(self.pretrained_model, adapter_config, adapter_name)
        self.pretrained_model.set_adapter(adapter_name)

    def load_adapter(
        self,
        peft_model_id: str | os.PathLike,
        adapter_name: str | None = None,
        is_trainable: bool = False,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        """Loads a saved adapter (frozen unless `is_trainable`), and the value head saved with it, if any.

        The first adapter becomes active; a further one is only added, as in peft (activate it with `set_adapter`).
        """
        hub_kwargs = {key: value for key, value in (("token", token), ("revision", revision)) if value is not None}
        files = SourceFiles(peft_model_id, hub_kwargs)
        adapter = require_adapter(files)
        self.pretrained_model = load_adapter(self.pretrained_model, adapter, adapter_name or "default", is_trainable)
        self._load_adapter_value_head(files)

    def set_adapter(self, adapter_name: str) -> None:
        self._peft_model().set_adapter(adapter_name)

    def disable_adapters(self) -> None:
        self._peft_model().base_model.disable_adapter_layers()

    def enable_adapters(self) -> None:
        self._peft_model().base_model.enable_adapter_layers()

    def active_adapters(self) -> list[str]:
        return list(self._peft_model().active_adapters)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        for name in _names(adapter_names):
            self._peft_model().delete_adapter(name)
            if name == self.ref_adapter_name:
                self.ref_adapter_name = None

    @contextmanager
    def _inference_state(self, switch: bool = False, adapter_name: str | None = None) -> Iterator[None]:
        """Eval mode and no gradients for the block, with `adapter_name` as the only active adapter when `switch`
        (`None`: every adapter off). The modes of all modules, the adapters and `requires_grad` are put back after the
        block, also when it raises; the model's lock keeps concurrent callers from seeing each other's switch."""
        with self._adapter_lock, torch.no_grad():
            modes = [(module, module.training) for module in self.modules()]
            self.eval()
            try:
                if switch:
                    with switched_adapter(self._peft_model(), adapter_name):
                        yield
                else:
                    yield
            finally:
                for module, training in modes:
                    module.training = training

    @contextmanager
    def as_reference(self) -> Iterator[None]:
        """Within the block the model is the PPO reference of its PEFT policy: the adapter named by
        `ref_adapter_name` (see [`copy_adapter_as_reference`]), or else no adapter at all (the base model). Eval mode
        and no gradients; everything is put back on exit.

        Example:

        ```python
        with model.as_reference():
            reference_logits = model(input_ids, attention_mask=attention_mask).logits
        ```
        """
        with self._inference_state(switch=True, adapter_name=self.ref_adapter_name):
            yield

    def copy_adapter_as_reference(self, adapter_name: str = "ref") -> None:
        """Keeps the policy's current adapter, as it is now, as a frozen reference adapter `adapter_name`, which
        [`as_reference`] then uses instead of the base model. Call it when the policy starts from an already-trained
        adapter (TRL #495): its KL penalty must be taken against that adapter, not the bare base. The copy is not
        saved with the policy."""
        active = self.active_adapters()
        if len(active) != 1:
            raise ValueError(f"Exactly one adapter must be active to copy it as the reference; active: {active}.")
        copy_adapter(self._peft_model(), active[0], adapter_name)
        self.ref_adapter_name = adapter_name
