"""Configs of the value-head models: the wrapped model's config under `text_config`, plus the head's settings.

No `from __future__ import annotations` here: transformers' strict config dataclasses validate field types from the
annotations, and string annotations would silently switch that validation off.
"""

import json
import os
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

from .errors import (
    HiddenSizeNotFoundError,
    InvalidConfigError,
    TransformersVheadError,
    UnknownBaseModelTypeError,
    UnknownInitStrategyError,
    WrongModelKindError,
)

# `None` keeps PyTorch's default `nn.Linear` init, as TRL did; "normal" draws N(0, v_head_initializer_range), zero bias.
V_HEAD_INIT_STRATEGIES = (None, "normal")

# The head's settings, which `from_pretrained` and the TRL-style `Model(pretrained_model, **settings)` accept.
HEAD_SETTINGS = (
    "summary_dropout_prob",
    "v_head_init_strategy",
    "v_head_initializer_range",
    "upcast_logits",
    "score_mean",
    "score_std",
    "v_head_hidden_size",
)

# Settings TRL code reads through `model.config` as if it were the wrapped model's config. Reads and writes of these
# go to `text_config`, so `model.config.pad_token_id = tokenizer.pad_token_id` still reaches the wrapped model.
TEXT_CONFIG_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "use_cache",
)


def resolve_hidden_size(config: PreTrainedConfig) -> int:
    """The width of the hidden state the value head reads, in TRL 1.12's order of lookups.

    Args:
        config: the wrapped model's config.

    Returns:
        `word_embed_proj_dim` (OPT's projected output), else `hidden_size`, else `text_config.hidden_size`
        (multimodal configs), else `decoder.hidden_size` (encoder-decoder compositions).

    Raises:
        HiddenSizeNotFoundError: when none of those is set.
    """
    if getattr(config, "word_embed_proj_dim", None) is not None:
        return config.word_embed_proj_dim
    if getattr(config, "hidden_size", None) is not None:
        return config.hidden_size
    text_config = getattr(config, "text_config", None)
    if getattr(text_config, "hidden_size", None) is not None:
        return text_config.hidden_size
    decoder = getattr(config, "decoder", None)
    if getattr(config, "is_encoder_decoder", False) and getattr(decoder, "hidden_size", None) is not None:
        return decoder.hidden_size
    raise HiddenSizeNotFoundError(
        f"Cannot find the hidden size of {type(config).__name__} (model_type "
        f"{getattr(config, 'model_type', None)!r}): it sets none of "
        "`word_embed_proj_dim`, `hidden_size`, `text_config.hidden_size` or `decoder.hidden_size`. Set one of them "
        "on the config of the model you wrap."
    )


def base_summary_dropout_prob(config: PreTrainedConfig) -> int | float:
    """TRL's default head dropout for a wrapped model: its config's `summary_dropout_prob` when it has one (`None`
    there, as in TRL, is no dropout), else 0.1."""
    value = getattr(config, "summary_dropout_prob", 0.1)
    return 0.0 if value is None else value


def explicit_head_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Head settings given as keywords, with TRL's meaning of an explicit `summary_dropout_prob=None`: no dropout (TRL
    built `nn.Identity` for any falsy probability). On the config, `None` means "not given": the default applies."""
    if "summary_dropout_prob" in settings and settings["summary_dropout_prob"] is None:
        settings = {**settings, "summary_dropout_prob": 0.0}
    return settings


def describe_v_head_init(strategy: str | None, initializer_range: float) -> str:
    """How a fresh head is initialised, in words (for logs and model cards)."""
    if strategy == "normal":
        return f"normal(std={initializer_range})"
    return "PyTorch's default nn.Linear"


def _text_config_property(name: str) -> property:
    def read(self):
        return getattr(self.text_config, name)

    def write(self, value):
        setattr(self.text_config, name, value)

    return property(read, write, doc=f"`text_config.{name}`, read and written through the value-head config.")


@strict
class ValueHeadConfig(PreTrainedConfig):
    r"""
    The common part of the two value-head configs: the wrapped model's config and the value head's settings.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The config of the wrapped language model. A dict is resolved through `AutoConfig` by its `model_type`.
        summary_dropout_prob (`float`, *optional*):
            Dropout before the value head. Defaults to the wrapped config's `summary_dropout_prob` when it has one,
            else 0.1, as in TRL. 0 disables it.
        v_head_init_strategy (`str`, *optional*):
            How a fresh value head is initialised: `None` keeps PyTorch's default `nn.Linear` init (TRL's default),
            `"normal"` draws the weight from N(0, `v_head_initializer_range`) and zeroes the bias.
        v_head_initializer_range (`float`, *optional*, defaults to 0.2):
            Standard deviation of the `"normal"` init.
        upcast_logits (`bool`, *optional*, defaults to `True`):
            Return the LM logits in fp32, as TRL does. `False` keeps the wrapped model's dtype (half the memory in
            bf16/fp16).
        score_mean (`float`, *optional*), score_std (`float`, *optional*):
            The mean and standard deviation of the value head's sequence scores (OpenRLHF's `mean`/`std`):
            `compute_sequence_scores(..., normalize=True)` returns `(score - score_mean) / score_std`.
        base_model_name_or_path (`str`, *optional*):
            Where the wrapped model was loaded from, for the model card's `base_model`.
        v_head_hidden_size (`int`, *optional*):
            The width of a ReLU hidden layer before the head's output layer: the MLP head of trlx checkpoints
            (`2 * hidden_size` there), set when one is loaded. `None`, the default, is TRL's single linear layer.
    """

    base_model_kind: ClassVar[str] = ""
    base_model_mapping: ClassVar[Any] = None

    # The config object first: strict validation tries the union in order and builds an error message (with the
    # whole config's repr, about 1 ms) for each member that does not match.
    text_config: PreTrainedConfig | dict | None = None
    summary_dropout_prob: int | float | None = None
    v_head_init_strategy: str | None = None
    v_head_initializer_range: int | float = 0.2
    upcast_logits: bool = True
    score_mean: int | float | None = None
    score_std: int | float | None = None
    base_model_name_or_path: str | None = None
    v_head_hidden_size: int | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, PreTrainedConfig):
            # The base __post_init__ sets these recursively, to None unless given: a loaded model's config would lose
            # its attention implementation (and then build no attention mask), so keep the ones it has.
            kwargs.setdefault("attn_implementation", self.text_config._attn_implementation)
            kwargs.setdefault("experts_implementation", self.text_config._experts_implementation)
        if isinstance(self.text_config, dict):
            base_type = self.text_config.get("model_type")
            if base_type is not None and base_type not in CONFIG_MAPPING:
                raise UnknownBaseModelTypeError(
                    f"text_config has model_type {base_type!r}, which this transformers install does not know. "
                    "Upgrade transformers, or import the package that registers that model type before loading."
                )
        super().__post_init__(**kwargs)
        if self.base_model_name_or_path and os.path.isdir(self.base_model_name_or_path):
            # a local path is kept absolute, so it is never mistaken for a hub id once the working directory changes
            self.base_model_name_or_path = os.path.abspath(self.base_model_name_or_path)
        if self.summary_dropout_prob is None:
            self.summary_dropout_prob = base_summary_dropout_prob(self.text_config)
        self._check_base_model_kind()
        resolve_hidden_size(self.text_config)  # fail now, not when the head is built
        self.is_encoder_decoder = bool(getattr(self.text_config, "is_encoder_decoder", False))

    def __setattr__(self, name: str, value: Any):
        # checked on every assignment: `from_pretrained(path, v_head_init_strategy=...)` sets it after __init__
        if name == "v_head_init_strategy" and value not in V_HEAD_INIT_STRATEGIES:
            raise UnknownInitStrategyError(
                f"Unknown v_head_init_strategy {value!r}; the valid ones are "
                f"{', '.join(repr(strategy) for strategy in V_HEAD_INIT_STRATEGIES)}."
            )
        super().__setattr__(name, value)

    def _check_base_model_kind(self):
        if isinstance(self.text_config, ValueHeadConfig):
            raise WrongModelKindError("text_config is already a value-head config: a value head cannot wrap another.")
        if getattr(self.text_config, "auto_map", None):
            return  # remote code: its own auto_map decides which class it is
        if type(self.text_config) not in self.base_model_mapping:
            raise WrongModelKindError(
                f"{type(self.text_config).__name__} (model_type {self.text_config.model_type!r}) is not a "
                f"{self.base_model_kind}, so {type(self).__name__} cannot wrap it. Causal LMs go in "
                "AutoModelForCausalLMWithValueHead, seq2seq LMs in AutoModelForSeq2SeqLMWithValueHead."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Reads `config.json`; a plain model's config becomes `text_config` (its checkpoint gets a fresh head).

        Raises:
            InvalidConfigError: `config.json` is not JSON, not a JSON object, or names no `model_type`.
        """
        source = str(pretrained_model_name_or_path)
        try:
            config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except OSError as exc:
            # transformers replaces the JSON error with a bare OSError; the error it replaced says where the JSON breaks
            if not isinstance(exc.__context__, (json.JSONDecodeError, UnicodeDecodeError)):
                raise
            raise InvalidConfigError(
                f"{_config_file_of(source)} is not valid JSON ({exc.__context__}): the file is corrupt or cut short. "
                "Save the model again with save_pretrained, or download the file again."
            ) from exc
        if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
            what = "no `model_type`" if isinstance(config_dict, dict) else f"a JSON {type(config_dict).__name__}"
            raise InvalidConfigError(
                f"{_config_file_of(source)} holds {what}, so it does not say which model it describes. A value-head "
                f'model\'s config has "model_type": "{cls.model_type}" and the wrapped model\'s config under '
                '`text_config`; a plain model\'s has its own model_type (e.g. "llama"). Fix the file, or save the '
                "model again with save_pretrained."
            )
        # lets `from_dict` name the file, as it can under AutoConfig; a file read directly is named by its source
        kwargs.setdefault("name_or_path", source)
        return cls._as_value_head_dict(config_dict, kwargs["name_or_path"]), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Like `PreTrainedConfig.from_dict`, and a keyword that is a setting of the wrapped model goes to `text_config`
        (`from_pretrained(path, attention_dropout=0.1)` means what it means for the plain model).

        This is where `from_pretrained` and `AutoConfig.from_pretrained` build the config from `config.json`, so the
        dict is held to what a saved config has: a `text_config` that names its `model_type` (a config built in code
        may leave it out and get TRL's default, GPT-2; a saved one always has it, so a file without it is damaged), and
        fields of the right types.

        Raises:
            InvalidConfigError: no `text_config`, a `text_config` that is not an object or names no `model_type`, or a
                field of the wrong type, naming the `config.json` it came from (`name_or_path`).
        """
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        source = _config_file_of(kwargs.get("name_or_path"))
        config_dict = cls._as_value_head_dict(config_dict)
        cls._check_text_config(config_dict, source)
        as_read = dict(config_dict)  # `PreTrainedConfig.from_dict` writes some keywords into the dict
        try:
            config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        except TransformersVheadError:
            raise
        except (StrictDataclassError, ValueError, TypeError, KeyError) as exc:
            if not _fails_alone(cls, as_read):
                raise  # the keywords given with the file are wrong, not the file
            detail = " ".join(str(exc).split()).split(" Errors: ")[0]  # a union's error lists each member's again
            detail = detail if len(detail) <= 400 else detail[:400] + " ..."
            raise InvalidConfigError(
                f"{source} cannot describe a {cls.base_model_kind} with a value head: {detail}. Fix that field (the "
                "file was edited by hand or is corrupt), or save the model again with save_pretrained."
            ) from exc
        for key in [key for key in unused if hasattr(config.text_config, key)]:
            setattr(config.text_config, key, unused.pop(key))
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def _check_text_config(cls, config_dict: dict[str, Any], source: str) -> None:
        text_config = config_dict.get("text_config")
        if isinstance(text_config, PreTrainedConfig):
            return
        if text_config is None:
            raise InvalidConfigError(
                f"{source} has no `text_config`: the config of the language model a {cls.__name__} wraps is missing, "
                "so it cannot say which model to build. Save the model again with save_pretrained, or load the base "
                "model's own directory for a fresh value head."
            )
        if not isinstance(text_config, dict):
            raise InvalidConfigError(
                f"{source} has a `text_config` of type {type(text_config).__name__} ({str(text_config)[:60]!r}); it "
                "must be a JSON object, the wrapped model's config. Fix the file, or save the model again with "
                "save_pretrained."
            )
        if not isinstance(text_config.get("model_type"), str):
            raise InvalidConfigError(
                f"{source} has a `text_config` without a `model_type`, so it does not say which model it wraps (it "
                f"would silently become a {cls.sub_configs_defaults['text_config'].model_type}). Add the wrapped "
                'model\'s model_type to text_config (e.g. "model_type": "llama"), or save the model again with '
                "save_pretrained."
            )

    @classmethod
    def _as_value_head_dict(cls, config_dict: dict[str, Any], name_or_path: str | None = None) -> dict[str, Any]:
        model_type = config_dict.get("model_type")
        if model_type == cls.model_type or not config_dict:
            return config_dict
        if model_type in VALUE_HEAD_MODEL_TYPES:
            raise WrongModelKindError(
                f"This checkpoint is a {model_type!r} value-head model, not a {cls.model_type!r} one: load it with "
                "its own class, or with the matching AutoModelFor...LM."
            )
        return {
            "model_type": cls.model_type,
            "text_config": config_dict,
            "dtype": config_dict.get("dtype", config_dict.get("torch_dtype")),
            "base_model_name_or_path": name_or_path,
        }


def _config_file_of(name_or_path: str | os.PathLike | None) -> str:
    """How an error names the `config.json` of `name_or_path`: its path, or the hub id it belongs to."""
    if not name_or_path:
        return "The config dict"
    path = str(name_or_path)
    if os.path.isdir(path):
        return os.path.join(path, "config.json")
    if os.path.isfile(path):
        return path
    return f"The config.json of {path}"


def _fails_alone(config_class: type[PreTrainedConfig], config_dict: dict[str, Any]) -> bool:
    """Whether `config_dict` fails to build a config without any keyword (run only once building it failed)."""
    try:
        config_class(**config_dict)
    except Exception:
        return True
    return False


for _name in TEXT_CONFIG_ATTRIBUTES:
    setattr(ValueHeadConfig, _name, _text_config_property(_name))


@strict
class CausalLMWithValueHeadConfig(ValueHeadConfig):
    r"""
    Config of [`AutoModelForCausalLMWithValueHead`]: a causal LM's config under `text_config` and the value head's
    settings (see [`ValueHeadConfig`]).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from transformers_vhead import CausalLMWithValueHeadConfig
    >>> config = CausalLMWithValueHeadConfig(text_config=LlamaConfig(hidden_size=64), v_head_init_strategy="normal")
    >>> config.hidden_size, config.text_config.model_type
    (64, 'llama')

    ```
    """

    model_type = "transformers-vhead-causal-lm"
    base_model_kind = "causal LM"
    base_model_mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}


@strict
class Seq2SeqLMWithValueHeadConfig(ValueHeadConfig):
    r"""
    Config of [`AutoModelForSeq2SeqLMWithValueHead`]: a seq2seq LM's config under `text_config` and the value head's
    settings (see [`ValueHeadConfig`]).
    """

    model_type = "transformers-vhead-seq2seq-lm"
    base_model_kind = "seq2seq LM"
    base_model_mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5")}


VALUE_HEAD_MODEL_TYPES = (CausalLMWithValueHeadConfig.model_type, Seq2SeqLMWithValueHeadConfig.model_type)
