"""Reward adapters and sequence scores.

A reward model can be a second LoRA adapter on the policy's base weights plus its `score` head (TRL's "multi-adapter
RL"). Scoring switches to that adapter, runs the decoder only (never the LM head), applies the head, and puts back
the active adapter, the train/eval modes and `requires_grad` afterwards, also when the call raises. The model's lock
serialises scoring, so concurrent callers never see each other's adapter switch.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import logging

from .adapters import check_adapter_fits, load_adapter, require_adapter
from .capture import final_hidden_state
from .configuration import resolve_hidden_size
from .errors import (
    AdapterMismatchError,
    CorruptCheckpointError,
    EmptySequenceError,
    InvalidConfigError,
    MissingScoreHeadError,
    RewardAdapterError,
)
from .heads import ScoreHead
from .inputs import check_model_inputs
from .packing import is_packed_form, last_token_positions
from .peft_support import is_peft_model, require_peft, without_peft
from .safe_reading import read_tensors
from .sources import SourceFiles, hub_kwargs_of

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.get_logger(__name__)

SCORE_MODULE = "score"  # TRL's `supported_rm_modules`; also transformers' `*ForSequenceClassification` head


def _score_tensors(weights_file: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The `score` head's tensors in an adapter's weights file (whose tensor `shapes` are given), keyed `weight` /
    `bias`."""
    tensors = read_tensors(weights_file, lambda name: SCORE_MODULE in name.split("."))
    found = {name.rsplit(".", 1)[-1]: tensor for name, tensor in tensors.items()}
    if "weight" not in found:
        keys = list(shapes)
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
        raise MissingScoreHeadError(
            f"{weights_file} holds no `{SCORE_MODULE}` head (no key with a `{SCORE_MODULE}` module; found: {shown}). "
            "A reward adapter is trained with task_type='SEQ_CLS', whose `score` layer peft saves with the adapter "
            "(modules_to_save); train and save it that way."
        )
    for name, tensor in tensors.items():  # a broken head would score every sequence NaN, or as noise
        if not tensor.dtype.is_floating_point:
            raise CorruptCheckpointError(
                f"{weights_file} holds the reward head's `{name}` as {str(tensor.dtype).removeprefix('torch.')}, but a "
                "reward head's weights are floating point: the file is corrupt or is no reward adapter. Load an "
                "earlier save of the reward adapter."
            )
        if not torch.isfinite(tensor.float()).all():
            raise CorruptCheckpointError(
                f"{weights_file} holds NaN or infinity in the reward head's `{name}`: the training that wrote it "
                "diverged, or the file is corrupt. Load an earlier save of the reward adapter."
            )
    return found


def _normalization(files: SourceFiles) -> tuple[float | None, float | None]:
    """OpenRLHF's reward statistics: `mean` and `std` in a `config.json` saved next to the adapter.

    Raises:
        InvalidConfigError: the `config.json` is not a JSON object, or `mean` / `std` are not numbers.
    """
    model_id = files.source
    config = files.config_dict()
    mean, std = config.get("mean"), config.get("std")
    if mean is None or std is None:
        return None, None
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (mean, std)):
        raise InvalidConfigError(
            f"The config.json of the reward adapter at {model_id} gives the reward statistics mean={mean!r}, "
            f"std={std!r}: they must be numbers. Fix them in that file, or remove them to score without normalising."
        )
    return float(mean), float(std)


def load_reward_adapter(
    model: PeftModel, adapter_model_id: str | os.PathLike, adapter_name: str, hidden_size: int, hub_kwargs: dict
) -> ScoreHead:
    """Loads a reward adapter, frozen, onto `model` and returns its score head.

    Everything is checked before the adapter is added, so a bad adapter leaves `model` as it was.

    Raises:
        RewardAdapterError: `model` is not a `PeftModel`, or `adapter_model_id` is not a path or hub id.
        AdapterNotFoundError: `adapter_model_id` holds no adapter.
        MissingScoreHeadError: the adapter's weights hold no `score` head (names the file and the keys found).
        AdapterMismatchError: the adapter or its head was trained for a base model of another size.
        UnsafePickleError: the adapter's `.bin` would run code when unpickled (it is not unpickled).
        CorruptCheckpointError: its weights file is corrupt, or its `score` head is not finite floating point.
        InvalidConfigError: the `config.json` beside it is not JSON, or its reward statistics are not numbers.
    """
    if not isinstance(adapter_model_id, (str, os.PathLike)):
        raise RewardAdapterError(
            f"reward_adapter must be a local path or a hub id of a saved reward adapter, got "
            f"{type(adapter_model_id).__name__}."
        )
    require_peft("A reward adapter")
    if not is_peft_model(model):
        raise RewardAdapterError(
            "A reward adapter sits next to the policy's adapter on the same base weights, so it needs a PEFT policy: "
            "load the model with `peft_config=...` (or from a saved adapter), then add the reward adapter."
        )
    files = SourceFiles(adapter_model_id, hub_kwargs)
    adapter = require_adapter(files)
    weights_file = adapter.weights_file
    shapes = adapter.shapes
    tensors = _score_tensors(weights_file, shapes)
    weight = tensors["weight"]
    if weight.shape[-1] != hidden_size:
        raise AdapterMismatchError(
            f"The score head in {weights_file} reads hidden states of width {weight.shape[-1]}, but this model's are "
            f"{hidden_size} wide: the reward adapter was trained for another base model."
        )
    check_adapter_fits(model, weights_file, shapes)
    mean, std = _normalization(files)
    device = model.get_input_embeddings().weight.device
    head = ScoreHead(weight.to(device), tensors.get("bias"), mean=mean, std=std)  # bias from the score keys only
    load_adapter(model, adapter, adapter_name, is_trainable=False)
    logger.info(f"Reward adapter {adapter_name!r} loaded from {weights_file} ({head.out_features} label(s)).")
    return head


def last_token_indices(attention_mask: torch.Tensor) -> torch.LongTensor:
    """The position of each row's last attended token, whatever the padding side, and correct when pad == eos
    (the mask decides, not the token ids).

    Raises:
        EmptySequenceError: a row of the mask is all zeros.
    """
    attended = attention_mask.bool()
    empty = ~attended.any(dim=-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise EmptySequenceError(
            f"Row(s) {rows} of the attention mask are all zeros, so they have no token to score. Drop empty "
            "sequences before scoring."
        )
    length = attention_mask.shape[-1]
    return length - 1 - attended.flip(-1).int().argmax(dim=-1)


def _takes_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(without_peft(model).forward).parameters


class RewardScoring:
    """The scoring methods of the value-head models (mixed into `PreTrainedModelWrapper`)."""

    @property
    def score(self) -> nn.Module:
        """The head of the critic protocol: the reward adapter's `score` head when the model has one (TRL's
        attribute), else the value head.

        RL code written for transformers' sequence / token classifiers (TRL's `PPOTrainer` and `get_reward`, verl,
        OpenRLHF) runs `getattr(model, model.base_model_prefix)(..., output_hidden_states=True)` and then
        `model.score(hidden_states[-1])`: for this model that is the wrapped LM, then this head, so the values equal
        `compute_values`. The protocol does not switch adapters: with a reward adapter, call `compute_sequence_scores`
        instead. A property, not a second module: nothing is saved or counted twice.
        """
        reward_head = self._modules.get(SCORE_MODULE)
        return self.v_head if reward_head is None else reward_head

    @classmethod
    def add_and_load_reward_modeling_adapter(
        cls, pretrained_model: PeftModel, adapter_model_id: str, adapter_name: str = "reward_model_adapter", token=None
    ) -> ScoreHead:
        """TRL's classmethod: loads a reward adapter onto a `PeftModel` (frozen) and returns its `score` head.

        `from_pretrained(..., reward_adapter=path, reward_adapter_name=name)` does this and attaches the head as
        `model.score`.
        """
        hidden_size = resolve_hidden_size(pretrained_model.config)
        hub_kwargs = {"token": token} if token is not None else {}
        return load_reward_adapter(pretrained_model, adapter_model_id, adapter_name, hidden_size, hub_kwargs)

    def _attach_reward_adapter(self, adapter_model_id, adapter_name: str, kwargs: dict) -> None:
        hub_kwargs = hub_kwargs_of(kwargs)
        hub_kwargs.pop("subfolder", None)  # the subfolder names where the policy is, not the reward adapter
        head = load_reward_adapter(
            self.pretrained_model, adapter_model_id, adapter_name, self.v_head.summary.in_features, hub_kwargs
        )
        self.score = head
        self.supports_rm_adapter = True
        self.rm_adapter_name = adapter_name

    def _scoring_hidden_states(self, inputs: dict) -> torch.Tensor:
        """The decoder's final hidden state; the LM head never runs."""
        inputs.setdefault("use_cache", False)
        with final_hidden_state(self.pretrained_model.get_decoder(), stop=True) as captured:
            self.pretrained_model(**inputs)
        return captured[-1]

    def _scoring_head(self) -> tuple[nn.Module, str | None, float | None, float | None]:
        if getattr(self, "supports_rm_adapter", False):
            return self.score, self.rm_adapter_name, self.score.mean, self.score.std
        return self.v_head, None, self.config.score_mean, self.config.score_std

    def compute_reward_score(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """TRL's per-token reward scores: the reward adapter and its `score` head on every position.

        Returns:
            fp32 scores `(batch, seq, num_labels)`; the caller picks the token (see [`compute_sequence_scores`]).

        Raises:
            RewardAdapterError: the model has no reward adapter.
            InvalidInputError: inputs the model cannot run (see [`check_model_inputs`]), before the adapter is switched.
        """
        if not getattr(self, "supports_rm_adapter", False):
            raise RewardAdapterError(
                "This model has no reward adapter: load it with `reward_adapter=<path or hub id>` (on a PEFT policy)."
            )
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        check_model_inputs(self, inputs)
        with self._inference_state(switch=True, adapter_name=self.rm_adapter_name):
            hidden = self._scoring_hidden_states(inputs)
            return self.score(hidden)

    def compute_sequence_scores(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        normalize: bool = False,
        return_token_scores: bool = False,
        **kwargs,
    ):
        """One fp32 score per sequence, read at its last attended token.

        The reward adapter and its `score` head score when the model has one; otherwise the value head does (a critic's
        or a value-head reward model's value). The last token comes from the attention mask, so left and right padding
        and pad == eos all give the same score; position ids are derived from the mask when the model takes them (a
        left-padded sequence scores as if unpadded). A seq2seq decoder with absolute positions (BART, Pegasus) takes
        no position ids: pad its inputs on the right. The LM head never runs, gradients are off, and the active adapter
        and train/eval modes are put back afterwards.

        A padding-free (packed) batch, `position_ids` restarting at 0 for each sequence and no attention mask (see
        [`pack_batch`], transformers' `DataCollatorWithFlattening`), gives one score per packed sequence, read at its
        last token, in order: `(num_sequences,)`.

        Args:
            input_ids: `(batch, seq)` token ids (for a seq2seq model, the source; pass `decoder_input_ids` and
                `decoder_attention_mask` for the sequence to score).
            attention_mask: `(batch, seq)`; `None` means no padding.
            normalize: return `(score - mean) / std` with the statistics stored with the reward adapter (its
                `config.json`'s `mean`/`std`) or, for the value head, `config.score_mean` / `config.score_std`.
            return_token_scores: also return every position's score, `(batch, seq)` (or `(batch, seq, num_labels)`).
            kwargs: passed to the wrapped model.

        Returns:
            `(batch,)` scores (`(batch, num_labels)` for a multi-label reward head; `(num_sequences,)` for a packed
            batch); with `return_token_scores`, the tuple `(scores, token_scores)`.

        Raises:
            EmptySequenceError: a row of the mask is all zeros.
            InvalidInputError: other inputs the model cannot run (ids and mask of different shapes, ids out of the
                vocabulary, float ids, an empty batch; see [`check_model_inputs`]), before any work.
            ValueError: `normalize=True` but no statistics are stored.

        Example:

        ```python
        scores = model.compute_sequence_scores(batch["input_ids"], batch["attention_mask"])  # (batch,)
        ```
        """
        head, adapter_name, mean, std = self._scoring_head()
        if normalize and (mean is None or std is None):
            raise ValueError(
                "normalize=True needs a stored mean and std: save `mean`/`std` in the reward adapter's config.json, or "
                "set `model.config.score_mean` / `model.config.score_std` for the value head."
            )
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        check_model_inputs(self, inputs)
        packed = is_packed_form(inputs) and not self.config.is_encoder_decoder
        if self.config.is_encoder_decoder:
            score_mask = kwargs.get("decoder_attention_mask")
        else:
            score_mask = attention_mask
            # only a padded batch needs them: without padding they equal the model's own (and per-row ids would
            # cost per-row rotary tables)
            if (
                attention_mask is not None
                and "position_ids" not in kwargs
                and not attention_mask.bool().all()
                and _takes_position_ids(self.pretrained_model)
            ):
                inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self._inference_state(switch=adapter_name is not None, adapter_name=adapter_name):
            hidden = self._scoring_hidden_states(inputs)
            batch = torch.arange(hidden.shape[0], device=hidden.device)
            if packed:  # each packed sequence's last token
                positions = kwargs["position_ids"].to(hidden.device).expand(hidden.shape[0], -1)
                batch, last = last_token_positions(positions)
            elif score_mask is None:
                last = torch.full_like(batch, hidden.shape[1] - 1)
            else:
                last = last_token_indices(score_mask).to(hidden.device)
            head_device = next(head.parameters()).device
            if return_token_scores:
                token_scores = head(hidden.to(head_device))
                scores = token_scores[batch, last]
            else:
                scores = head(hidden[batch, last].to(head_device))
        if normalize:
            scores = (scores - mean) / std
        scores = scores.squeeze(-1) if scores.shape[-1] == 1 else scores
        if not return_token_scores:
            return scores
        if normalize:
            token_scores = (token_scores - mean) / std
        return scores, token_scores.squeeze(-1) if token_scores.shape[-1] == 1 else token_scores
