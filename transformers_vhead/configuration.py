"""Configs of the value-head models: the wrapped model's config under `text_config`, plus the head's settings.

No `from __future__ import annotations` here: transformers' strict config dataclasses validate field types from the
annotations, and string annotations would silently switch that validation off.
"""

import os
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

from .errors import HiddenSizeNotFoundError, UnknownBaseModelTypeError, UnknownInitStrategyError, WrongModelKindError

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
        """Reads `config.json`; a plain model's config becomes `text_config` (its checkpoint gets a fresh head)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls._as_value_head_dict(config_dict, str(pretrained_model_name_or_path)), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Like `PreTrainedConfig.from_dict`, and a keyword that is a setting of the wrapped model goes to `text_config`
        (`from_pretrained(path, attention_dropout=0.1)` means what it means for the plain model)."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(cls._as_value_head_dict(config_dict), return_unused_kwargs=True, **kwargs)
        for key in [key for key in unused if hasattr(config.text_config, key)]:
            setattr(config.text_config, key, unused.pop(key))
        return (config, unused) if return_unused_kwargs else config

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
