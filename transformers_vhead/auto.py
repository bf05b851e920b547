"""Registration of the value-head classes with transformers' auto classes, so plain `from_pretrained` finds them, of
the "value-scoring" pipeline task, and of the varlen attention (`attn_implementation="vhead_sdpa_varlen"`)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead
from .pipelines import TASK, ValueScoringPipeline
from .varlen_attention import register_varlen_attention

# (model class, the auto classes that return it); each config is registered under its own namespaced model_type.
REGISTRATIONS = (
    (AutoModelForCausalLMWithValueHead, (AutoModel, AutoModelForCausalLM)),
    (AutoModelForSeq2SeqLMWithValueHead, (AutoModel, AutoModelForSeq2SeqLM)),
)


def register() -> None:
    """Registers the configs with `AutoConfig`, the models with their auto classes, the "value-scoring" pipeline
    task and the varlen attention with transformers' attention interfaces. Idempotent; importing
    `transformers_vhead` calls it."""
    register_varlen_attention()
    for model_class, auto_classes in REGISTRATIONS:
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in auto_classes:
            auto_class.register(config_class, model_class, exist_ok=True)
    # registering again would log transformers' "already registered, overwriting" warning on every call
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is not ValueScoringPipeline:
        # `pipeline(TASK, model=path)` loads with these auto classes, which return the value-head classes
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=ValueScoringPipeline,
            pt_model=(AutoModelForCausalLM, AutoModelForSeq2SeqLM),
            type="text",
        )
