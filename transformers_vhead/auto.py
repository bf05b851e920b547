"""Registration of the value-head classes with transformers' auto classes, so plain `from_pretrained` finds them."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .modeling import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

# (model class, the auto classes that return it); each config is registered under its own namespaced model_type.
REGISTRATIONS = (
    (AutoModelForCausalLMWithValueHead, (AutoModel, AutoModelForCausalLM)),
    (AutoModelForSeq2SeqLMWithValueHead, (AutoModel, AutoModelForSeq2SeqLM)),
)


def register() -> None:
    """Registers the configs with `AutoConfig` and the models with their auto classes. Idempotent; importing
    `transformers_vhead` calls it."""
    for model_class, auto_classes in REGISTRATIONS:
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in auto_classes:
            auto_class.register(config_class, model_class, exist_ok=True)
