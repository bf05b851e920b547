"""Exports of a value-head model for other tools: the plain LM for serving, an HF sequence classifier, TRL's layout.

Each format is written with transformers' own `save_pretrained` (safetensors), so the result loads with the plain auto
classes. A PEFT policy is exported with its adapter merged into a copy of the base weights; the model given is never
changed. What a format cannot carry (the head, a head bias, a reward adapter) is either refused with an `ExportError`
or reported in `ExportResult.notes`.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from .configuration import base_summary_dropout_prob
from .errors import ExportError
from .layouts import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY
from .peft_support import is_peft_model, without_peft

EXPORT_FORMATS = ("causal-lm", "seq2seq-lm", "seq-cls", "trl")

# The plain-LM format that fits each kind of model (`config.is_encoder_decoder`).
_LM_FORMAT = {False: "causal-lm", True: "seq2seq-lm"}


@dataclass(frozen=True)
class ExportResult:
    """What [`export_model`] wrote.

    Args:
        directory: the directory holding the exported checkpoint.
        format: one of `EXPORT_FORMATS`.
        notes: plain-English lines on what the export changed or left out (the CLI prints them).
    """

    directory: Path
    format: str
    notes: tuple[str, ...]


def export_model(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    to: str,
    *,
    drop_bias: bool = False,
    max_shard_size: int | str = "50GB",
) -> ExportResult:
    """Writes a value-head model in a format other tools read.

    Formats:
    - `"causal-lm"` / `"seq2seq-lm"`: the wrapped language model alone (weights, config, generation config), for
      generation and serving engines. The value head is dropped.
    - `"seq-cls"` (causal models): an `AutoModelForSequenceClassification` checkpoint with `num_labels=1` whose `score`
      is the value head (TRL's `PPOTrainer` value model, OpenRLHF's critic/reward model). Its score has no bias, so a
      head with a nonzero bias is refused unless `drop_bias=True`.
    - `"trl"`: TRL 1.12's layout: the wrapped model's config and weights with `v_head.summary.*` in the same files, as
      `trl.experimental.ppo.AutoModelForCausalLMWithValueHead.from_pretrained` reads it.

    A PEFT policy is exported with its policy adapter merged into a copy of the base weights; the reward adapter and
    any other adapter are left out. `model` itself is never changed.

    Args:
        model: an `AutoModelForCausalLMWithValueHead` or `AutoModelForSeq2SeqLMWithValueHead`.
        save_directory: where to write; it must not exist yet, or be empty.
        to: the format, one of `EXPORT_FORMATS`.
        drop_bias: for `"seq-cls"`, export even when the value head's bias is nonzero (the exported values are then
            ours minus the bias).
        max_shard_size: as for `save_pretrained`.

    Returns:
        The directory, the format, and notes on what the export dropped or changed.

    Raises:
        ValueError: `to` is not one of `EXPORT_FORMATS`.
        FileExistsError: `save_directory` exists and is not an empty directory.
        ExportError: the format does not fit the model (a seq2seq model as `"causal-lm"` or `"seq-cls"`, an
            architecture without a single-linear sequence-classification head, a head with a hidden layer as `"trl"`
            or `"seq-cls"`), or would change the values (a nonzero head bias without `drop_bias`).

    Example:

    ```python
    from transformers_vhead.export import export_model

    result = export_model(model, "critic-seq-cls", to="seq-cls")
    print("\\n".join(result.notes))
    ```
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {to!r}; the formats are {', '.join(EXPORT_FORMATS)}.")
    directory = Path(save_directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{directory} already exists and is not an empty directory; an export never writes over other files. "
            "Choose a new directory, or remove this one first."
        )
    notes: list[str] = []
    # the cheap checks first, before a PEFT model is copied and merged
    if to in ("seq-cls", "trl") and len(model.v_head.linear_layers) > 1:
        raise ExportError(
            f"This value head has a hidden layer (trlx's MLP head, v_head_hidden_size="
            f"{model.config.v_head_hidden_size}), which the one-layer head of {to!r} cannot hold. Save it with "
            "save_pretrained (our layout keeps it), or export the language model alone."
        )
    if to == "seq-cls":
        seq_cls_class = _check_seq_cls(model, drop_bias, notes)
    elif to != "trl":
        _check_lm_format(model, to)

    language_model = _exported_language_model(model, notes)
    to_save, state_dict = language_model, None
    if to == "seq-cls":
        to_save = _seq_cls_model(model, language_model, seq_cls_class, notes)
    elif to == "trl":
        head = {f"v_head.{key}": tensor.detach() for key, tensor in model.v_head.state_dict().items()}
        state_dict = {**language_model.state_dict(), **head}
        notes.append(
            f"the value head is kept as {HEAD_WEIGHT_KEY} / {HEAD_BIAS_KEY} beside the base weights (TRL 1.12's "
            "layout): load it with transformers-vhead or TRL's AutoModelFor...WithValueHead; plain transformers "
            "loads the language model and ignores the head."
        )
        notes.extend(_unsaved_head_settings(model))
    else:
        notes.insert(
            0,
            "the value head was dropped: this is the plain language model, for generation and serving. Export 'trl' "
            "or 'seq-cls' to keep the head.",
        )

    with _new_directory(directory):
        to_save.save_pretrained(directory, state_dict=state_dict, max_shard_size=max_shard_size)
        if to_save.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)  # the one `model.generate` uses
    return ExportResult(directory=directory, format=to, notes=tuple(notes))


def _check_lm_format(model: PreTrainedModel, to: str) -> None:
    expected = _LM_FORMAT[bool(model.config.is_encoder_decoder)]
    if to != expected:
        kind = "seq2seq" if model.config.is_encoder_decoder else "causal"
        raise ExportError(
            f"{_architecture(model)} is a {kind} language model, so its plain-LM export is to={expected!r}, not {to!r}."
        )


def _check_seq_cls(model: PreTrainedModel, drop_bias: bool, notes: list[str]) -> type[PreTrainedModel]:
    """The sequence-classification class of the wrapped architecture, once the value head is known to fit it."""
    architecture = _architecture(model)
    if model.config.is_encoder_decoder:
        raise ExportError(
            f"{architecture} is a seq2seq model, and transformers' sequence classifiers of seq2seq models have an MLP "
            "head (dense, tanh, out_proj on the EOS token), not one linear layer, so the value head cannot become "
            "it. Export 'trl' to keep the head, or 'seq2seq-lm' for the language model alone."
        )
    text_config = model.config.text_config
    if type(text_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ExportError(
            f"transformers has no sequence-classification class for {architecture} (model_type "
            f"{text_config.model_type!r}), so it cannot be exported as 'seq-cls'. Export 'trl' to keep the head, or "
            "'causal-lm' for the language model alone."
        )
    bias = model.v_head.summary.bias
    if bias is not None and bool(bias.detach().ne(0).any()):
        value = float(bias.detach().float().reshape(-1)[0])
        if not drop_bias:
            raise ExportError(
                f"The value head has bias {value:.6g}, but a transformers sequence classifier's score head has no "
                f"bias: the exported values would be this model's values shifted by {-value:.6g}. Pass "
                "drop_bias=True (`--drop-bias` on the command line) to export them shifted, or export 'trl' to keep "
                "the head exactly."
            )
        notes.append(f"the value head's bias ({value:.6g}) was dropped: exported values are ours minus {value:.6g}.")
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(text_config)]


def _exported_language_model(model: PreTrainedModel, notes: list[str]) -> PreTrainedModel:
    """The wrapped language model; for a PEFT policy a copy with the policy adapter merged in (the others dropped)."""
    peft_model = model.pretrained_model
    if not is_peft_model(peft_model):
        return peft_model
    roles = {
        getattr(model, "rm_adapter_name", None): "the reward adapter",
        getattr(model, "ref_adapter_name", None): "the reference adapter",
    }
    candidates = [name for name in peft_model.peft_config if name not in roles]
    policy = getattr(model, "policy_adapter_name", "default")
    if policy not in candidates:
        if len(candidates) != 1:
            raise ExportError(
                f"Cannot tell which adapter is the policy to merge: adapters {sorted(peft_model.peft_config)}, none "
                f"named {policy!r}. Delete the others (`model.delete_adapter(name)`) and export again."
            )
        policy = candidates[0]
    others = [name for name in peft_model.peft_config if name != policy]
    merged = copy.deepcopy(peft_model)  # merging changes weights in place: the caller's model stays as it was
    for name in others:
        merged.delete_adapter(name)
    merged.set_adapter(policy)
    try:
        merged = merged.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError) as exc:
        raise ExportError(
            f"The {peft_model.peft_config[policy].peft_type} adapter {policy!r} cannot be merged into the base "
            f"weights ({exc}); every export format needs the merged weights. Save the model instead (adapter files)."
        ) from exc
    notes.append(f"the PEFT adapter {policy!r} was merged into the base weights (of a copy; the model is unchanged).")
    if others:
        left_out = ", ".join(f"{name!r}" + (f" ({roles[name]})" if name in roles else "") for name in others)
        notes.append(f"not exported: adapter(s) {left_out}, and any score head that goes with them.")
    return merged


def _seq_cls_model(
    model: PreTrainedModel, language_model: PreTrainedModel, seq_cls_class: type, notes: list[str]
) -> PreTrainedModel:
    """A `num_labels=1` sequence classifier sharing `language_model`'s base model, its score the value head's weight."""
    config = copy.deepcopy(language_model.config)
    config.num_labels = 1
    config.architectures = [seq_cls_class.__name__]
    dtype = language_model.dtype
    with torch.device("meta"):  # only the structure: its weights are the language model's and the value head's
        seq_cls = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    architecture = type(seq_cls).__name__
    head_name, head = _score_head(seq_cls)
    prefix = seq_cls.base_model_prefix
    base = getattr(language_model, language_model.base_model_prefix, None)
    if type(base) is not type(getattr(seq_cls, prefix)):
        raise ExportError(
            f"{architecture} is built on {type(getattr(seq_cls, prefix)).__name__}, but {type(language_model).__name__}"
            f" on {type(base).__name__}, so its weights cannot be shared. Export 'trl' or 'causal-lm' instead."
        )
    weight = model.v_head.summary.weight.detach()
    if tuple(weight.shape) != tuple(head.weight.shape):
        raise ExportError(
            f"{architecture}'s score head has shape {tuple(head.weight.shape)} but the value head "
            f"{tuple(weight.shape)}: they read different hidden states. Export 'trl' instead."
        )
    setattr(seq_cls, prefix, base)
    score = nn.Linear(head.in_features, 1, bias=False, device="meta")
    score.weight = nn.Parameter(weight.to(dtype=dtype, copy=True), requires_grad=False)
    parent, _, attribute = head_name.rpartition(".")
    setattr(seq_cls.get_submodule(parent), attribute, score)
    unset = [name for name, tensor in chain(seq_cls.named_parameters(), seq_cls.named_buffers()) if tensor.is_meta]
    if unset:
        raise ExportError(f"{architecture} has weights outside its base model and score head ({unset}); export 'trl'.")

    if dtype != weight.dtype:
        notes.append(
            f"the score head runs in the model's dtype ({dtype}): the value head's {weight.dtype} weight was cast to "
            "it, so exported values differ slightly from ours."
        )
    if config.pad_token_id is None:
        notes.append(
            "the config has no pad_token_id: transformers' sequence classifier then scores batches of one sequence "
            "only. Set config.pad_token_id (e.g. the tokenizer's pad token) in the exported config.json."
        )
    elif config.pad_token_id in _as_list(config.eos_token_id):
        notes.append(
            f"pad_token_id equals eos_token_id ({config.pad_token_id}): transformers' sequence classifier scores the "
            "last token that is not padding, so a sequence ending in EOS is scored at the token before it."
        )
    notes.extend(_unsaved_head_settings(model, dropout=False))
    return seq_cls


def _score_head(seq_cls: PreTrainedModel) -> tuple[str, nn.Linear]:
    """The dotted name and module of the classifier's head: its only module with weights outside the base model."""
    prefix = seq_cls.base_model_prefix
    heads = [
        (name, module)
        for name, module in seq_cls.named_modules()
        if name != prefix and not name.startswith(f"{prefix}.") and list(module.parameters(recurse=False))
    ]
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear) or heads[0][1].bias is not None:
        found = ", ".join(f"{name} ({type(module).__name__})" for name, module in heads)
        raise ExportError(
            f"{type(seq_cls).__name__}'s head is not one bias-free linear layer (found: {found}), so the value head "
            "cannot become it. Export 'trl' to keep the head, or 'causal-lm' for the language model alone."
        )
    return heads[0]


def _unsaved_head_settings(model: PreTrainedModel, dropout: bool = True) -> list[str]:
    """Notes on head settings the exported layout has no place for, when they differ from what a reload assumes."""
    config, notes = model.config, []
    if config.score_mean is not None or config.score_std is not None:
        notes.append(
            f"score_mean={config.score_mean} and score_std={config.score_std} (score normalisation) are not part of "
            "this format: pass them again when loading."
        )
    default_dropout = base_summary_dropout_prob(config.text_config)
    if dropout and config.summary_dropout_prob != default_dropout:
        notes.append(
            f"summary_dropout_prob={config.summary_dropout_prob} is not part of this format (a reload uses "
            f"{default_dropout}): pass summary_dropout_prob={config.summary_dropout_prob} to from_pretrained."
        )
    return notes


def _architecture(model: PreTrainedModel) -> str:
    """The wrapped language model's class name, e.g. `"LlamaForCausalLM"`."""
    return type(without_peft(model.pretrained_model)).__name__


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@contextmanager
def _new_directory(directory: Path) -> Iterator[None]:
    """Creates `directory` (or uses it, empty) for the block; a block that raises leaves no partial checkpoint."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
