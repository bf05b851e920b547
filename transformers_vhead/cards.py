"""Model cards (`README.md`) for saved value-head models, rendered from the templates in `model_cards/`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .configuration import ValueHeadConfig, describe_v_head_init, resolve_hidden_size
from .layouts import HeadSource

if TYPE_CHECKING:
    from peft import PeftConfig

# Wheels ship the templates inside the package; a source checkout (and an editable install) keeps them at the top.
_TEMPLATE_DIRS = (Path(__file__).parent / "model_cards", Path(__file__).parent.parent / "model_cards")


def template_path(name: str) -> Path:
    """The path of the model card template `name` (e.g. `"value_head_model.md"`)."""
    for directory in _TEMPLATE_DIRS:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"Model card template {name!r} not found in {', '.join(map(str, _TEMPLATE_DIRS))}.")


def hub_base_model(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a hub repo (the `base_model` a card may declare), else `None` (a local path)."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def head_origin(source: HeadSource | None, loaded_from: str | None) -> str:
    """Where the saved head started, for the card: the file (and model) it was loaded from, or its fresh init. Local
    paths are cut to their last part, so a card does not publish a machine's directories."""
    if source is None:
        return "not recorded"
    if not source.is_loaded:
        return f"a fresh head ({source.init} init) when the value head was added"
    where = hub_base_model(loaded_from) or (Path(str(loaded_from)).name if loaded_from else None)
    file = Path(source.file).name
    origin = f"loaded from `{file}` of `{where}`" if where else f"loaded from `{file}`"
    return f"{origin} ({source.layout} layout)" if source.layout else origin


def render_model_card(
    config: ValueHeadConfig,
    name_or_path: str,
    head_source: HeadSource | None = None,
    loaded_from: str | None = None,
    adapter: PeftConfig | None = None,
) -> ModelCard:
    """The card of a value-head model saved at (or pushed to) `name_or_path`.

    Args:
        config: the model's config.
        name_or_path: where the model is saved, used in the usage snippet.
        head_source: where the model's value head came from (`model.v_head_source`).
        loaded_from: what the model was loaded from (`model.name_or_path`).
        adapter: the policy adapter's config, for a PEFT policy saved as its adapter.

    Returns:
        A `huggingface_hub.ModelCard` whose YAML metadata declares `library_name: transformers` (our classes load it,
        an adapter too), the tags `transformers-vhead` and `value-head` (and `peft` for an adapter), the
        `pipeline_tag`, and `base_model` when the wrapped model (for an adapter: the base model its config names) is a
        hub repo. The text says what the model is, the head's settings and origin, and the reward normalisation when
        one is set.
    """
    base_model_type = config.text_config.model_type
    base = adapter.base_model_name_or_path if adapter is not None else config.base_model_name_or_path
    card_data = ModelCardData(
        library_name="transformers",
        tags=["transformers-vhead", "value-head", base_model_type] + (["peft"] if adapter is not None else []),
        base_model=hub_base_model(base),
        pipeline_tag="text2text-generation" if config.is_encoder_decoder else "text-generation",
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path("value_head_model.md")),
        model_name=Path(str(name_or_path)).name or str(name_or_path),
        name_or_path=str(name_or_path),
        model_kind=config.base_model_kind,
        auto_class="AutoModelForSeq2SeqLM" if config.is_encoder_decoder else "AutoModelForCausalLM",
        value_head_class=f"AutoModelFor{'Seq2Seq' if config.is_encoder_decoder else 'Causal'}LMWithValueHead",
        is_encoder_decoder=config.is_encoder_decoder,
        base_model_type=base_model_type,
        hidden_size=resolve_hidden_size(config.text_config),
        hidden_layer_size=config.v_head_hidden_size,
        summary_dropout_prob=config.summary_dropout_prob,
        init_strategy=describe_v_head_init(config.v_head_init_strategy, config.v_head_initializer_range),
        logits_dtype="fp32 (upcast, as TRL)" if config.upcast_logits else "the wrapped model's dtype",
        head_origin=head_origin(head_source, loaded_from),
        normalization=None if None in (config.score_mean, config.score_std) else (config.score_mean, config.score_std),
        adapter_type=adapter.peft_type.value if adapter is not None else None,
        adapter_rank=getattr(adapter, "r", None),
    )
