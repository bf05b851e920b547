"""The checks of model inputs that every entry point runs before any work: `forward`, `compute_values`, the scores, the
reference's log-probs and `forward_with_reference` (and through the scores, the `value-scoring` pipeline).

The bare model takes some bad inputs without a word (an attention mask of another shape, an all-zero mask row, a mask
of fractions) and fails deep inside on others (`IndexError: index out of range in self` for a token id outside the
vocabulary, a reshape error for an empty batch). Here each one is a named error of `transformers_vhead.errors` that says
which argument is wrong and what to do; the classes subclass what the bare model raised where that was meaningful
(`IndexError` for an id out of range, `TypeError` for float ids), so code catching those still catches ours.

The shape and dtype checks read no tensor values. The value checks (the smallest and largest id, all-zero mask rows,
fractions in a float mask) are a few small reductions read back together: one device sync per call. They are skipped
while torch.compile traces (a data-dependent branch would break the graph).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from .errors import (
    EmptySequenceError,
    InputDtypeError,
    InvalidInputError,
    InvalidPackedBatchError,
    PackedBatchNotSupportedError,
    TokenIdOutOfRangeError,
)
from .packing import CACHE_KEYS, is_packed_form, sequence_starts, unsupported_reason

ID_DTYPES = (torch.int64, torch.int32)  # what `nn.Embedding` takes

# Set while a caller that checked its inputs runs its forwards (`forward_with_reference`): they skip checking again.
_checked: ContextVar[bool] = ContextVar("transformers_vhead_inputs_checked", default=False)


@contextmanager
def inputs_checked() -> Iterator[None]:
    """Within the block, [`check_model_inputs`] does nothing: for an entry point that has checked its inputs once and
    then runs forwards of its own on them (each would check again, each a device sync)."""
    token = _checked.set(True)
    try:
        yield
    finally:
        _checked.reset(token)


def check_model_inputs(model: torch.nn.Module, inputs: Mapping[str, Any]) -> None:
    """Raises a named error for inputs `model` cannot run, before it runs anything.

    Checked, for `input_ids` / `attention_mask` (and `decoder_input_ids` / `decoder_attention_mask` of an
    encoder-decoder model): token ids are an integer tensor `(batch, seq)` of at least one row and one column, within
    the input embedding (`0 <= id < num_embeddings`); a 2-D mask has the ids' shape, or with a cache
    (`past_key_values` / `cache`) at least as many columns (past + new tokens), no row of zeros, and only 0 and 1 if it
    is a float mask. A 4-D mask (a custom or packed-sequence mask) is the model's business and is not checked; with
    `inputs_embeds` instead of ids, a 2-D mask is checked against their first two dimensions. 2-D `position_ids` have
    the ids' columns and one row or the ids' rows.

    A padding-free (packed) batch, `position_ids` without an attention mask or a cache (see `packing`): its position
    ids are integers of the ids' shape (or one row of it), start at 0 and restart only at 0; several sequences in a row
    are refused for an architecture that cannot keep them apart, and with `use_cache=True`.

    Args:
        model: the value-head model (its input embedding gives the vocabulary size).
        inputs: the keyword arguments of the call.

    Raises:
        InputDtypeError: ids that are not an integer tensor (float ids), or a mask that is not a tensor of booleans,
            integers or floats.
        TokenIdOutOfRangeError: an id that is negative or at least the embedding's size (an `IndexError` too).
        EmptySequenceError: rows of no tokens (0 columns), or a mask row of zeros.
        InvalidInputError: an empty batch, ids that are not 2-D, a mask of another shape than the ids, a float mask
            holding other values than 0 and 1.
        InvalidPackedBatchError: packed position ids of another shape or dtype, negative, not starting (or
            restarting) at 0; several packed sequences with `use_cache=True`.
        PackedBatchNotSupportedError: several packed sequences in a row, for an architecture that cannot keep them
            apart (`packing.UNSUPPORTED_MODEL_TYPES`, encoder-decoder models).
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and _checked.get():
        return
    has_cache = any(inputs.get(key) is not None for key in CACHE_KEYS)
    # (prefix, whether a cache makes its mask longer): a seq2seq model's cache holds the decoder's past
    groups = [("", False), ("decoder_", True)] if model.config.is_encoder_decoder else [("", True)]
    pending: list[tuple[str, torch.Tensor]] = []  # the tensors whose values are checked, read back at once
    for prefix, cached in groups:
        ids_name, mask_name = f"{prefix}input_ids", f"{prefix}attention_mask"
        ids, mask = inputs.get(ids_name), inputs.get(mask_name)
        shape, shape_of = None, ids_name
        if ids is not None:
            _check_ids(ids_name, ids)
            shape = tuple(ids.shape)
            pending.append((ids_name, ids))
        elif isinstance(inputs.get(f"{prefix}inputs_embeds"), torch.Tensor):
            shape, shape_of = tuple(inputs[f"{prefix}inputs_embeds"].shape[:2]), f"{prefix}inputs_embeds (batch, seq)"
        if mask is not None and _check_mask(mask_name, mask, shape, shape_of, cached and has_cache):
            pending.append((mask_name, mask))
        if not prefix and shape is not None and _check_positions(inputs, shape):
            pending.append(("position_ids", inputs["position_ids"]))
    if pending and not compiling and pending[0][1].device.type != "meta":  # a meta tensor has no values
        packed = any(name == "position_ids" for name, _ in pending)
        _check_values(pending, _num_embeddings(model), _packing_refusal(model, inputs) if packed else None)


def _check_ids(name: str, ids: Any) -> None:
    if not isinstance(ids, torch.Tensor):
        raise InputDtypeError(
            f"{name} must be a torch tensor of token ids, got {type(ids).__name__}: build it with the tokenizer "
            "(return_tensors='pt') or torch.tensor(..., dtype=torch.long)."
        )
    if ids.dtype not in ID_DTYPES:
        embeds = "inputs_embeds" if name == "input_ids" else "decoder_inputs_embeds"
        raise InputDtypeError(
            f"{name} holds {ids.dtype} values, but token ids must be integers (torch.long): convert them with "
            f"{name}.long() (if they are rounded ids), or pass embeddings as `{embeds}` instead."
        )
    if ids.dim() != 2:
        hint = f"add the batch dimension with {name}[None]" if ids.dim() == 1 else "pass one row per sequence"
        raise InvalidInputError(f"{name} must be 2-D (batch, sequence), got shape {tuple(ids.shape)}: {hint}.")
    if ids.shape[0] == 0:
        raise InvalidInputError(
            f"{name} is an empty batch (shape {tuple(ids.shape)}): there is nothing to run. Skip the call when the "
            "batch has no sequences."
        )
    if ids.shape[1] == 0:
        raise EmptySequenceError(
            f"{name} has rows of no tokens (shape {tuple(ids.shape)}): every sequence needs at least one token. Drop "
            "empty texts before tokenising (an empty string gives no tokens with a tokenizer that adds none)."
        )


def _check_mask(name: str, mask: Any, shape: tuple[int, ...] | None, shape_of: str, has_cache: bool) -> bool:
    """The mask's type and shape (against `shape`, that of `shape_of`); returns whether its values are to be checked
    (a 2-D mask)."""
    if not isinstance(mask, torch.Tensor):
        raise InputDtypeError(
            f"{name} must be a torch tensor, got {type(mask).__name__}: use the tokenizer's (return_tensors='pt')."
        )
    if mask.is_complex():
        raise InputDtypeError(
            f"{name} holds {mask.dtype} values: a mask holds 1 (attend) and 0 (padding), as booleans, integers or "
            "floats."
        )
    if mask.dim() == 4:  # a custom (or packed-sequence) mask: the model checks it
        return False
    if mask.dim() != 2:
        raise InvalidInputError(
            f"{name} must be 2-D (batch, sequence) with 1 for tokens and 0 for padding (or a 4-D custom mask), got "
            f"shape {tuple(mask.shape)}: use the mask the tokenizer returns with the ids."
        )
    if shape is not None:
        columns_fit = mask.shape[1] >= shape[1] if has_cache else mask.shape[1] == shape[1]
        if mask.shape[0] != shape[0] or not columns_fit:
            covers = (
                f"{shape[0]} rows and at least {shape[1]} columns (past + new tokens: a cache is given)"
                if has_cache
                else f"the shape of {shape_of}, {shape}"
            )
            raise InvalidInputError(
                f"{name} has shape {tuple(mask.shape)}, but it must have {covers}: pass the mask that was built with "
                "these ids (the tokenizer returns both)."
            )
    return True


def _check_positions(inputs: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """The shape of 2-D `position_ids` (any call), and the type and shape of a packed batch's; returns whether their
    values are to be checked (a packed batch)."""
    positions = inputs.get("position_ids")
    if not isinstance(positions, torch.Tensor):
        return False
    packed = is_packed_form(inputs)
    if positions.dim() == 2 or packed:
        if positions.dim() != 2 or positions.shape[1] != shape[1] or positions.shape[0] not in (1, shape[0]):
            hint = (
                "pass the position_ids packed with these ids (pack_batch or DataCollatorWithFlattening)"
                if packed
                else "they give the position of each new token"
            )
            raise (InvalidPackedBatchError if packed else InvalidInputError)(
                f"position_ids has shape {tuple(positions.shape)}, but it must be (batch, seq) like the ids, "
                f"{shape} (or one row, (1, {shape[1]})): {hint}."
            )
    if packed and positions.dtype not in ID_DTYPES:
        raise InvalidPackedBatchError(
            f"position_ids holds {positions.dtype} values, but positions are integers (torch.long): convert them with "
            "position_ids.long()."
        )
    return packed


def _packing_refusal(model: torch.nn.Module, inputs: Mapping[str, Any]) -> tuple[type[InvalidInputError], str] | None:
    """Why a packed batch of several sequences in a row cannot run with these inputs (None if it can)."""
    config = getattr(model.config, "text_config", model.config)
    reason = unsupported_reason(config)
    if reason is not None:
        return PackedBatchNotSupportedError, (
            f"{config.model_type} cannot run a packed batch: {reason}. Pass the padded batch with its attention mask "
            "instead (unpack it, or skip pack_batch / DataCollatorWithFlattening for this model)."
        )
    if inputs.get("use_cache"):
        return InvalidPackedBatchError, (
            "a packed batch cannot build a cache (transformers keeps packed sequences apart only without one): pass "
            "use_cache=False, or a padded batch with its attention mask to generate from."
        )
    return None


def _check_values(
    pending: list[tuple[str, torch.Tensor]],
    num_embeddings: int | None,
    packing_refusal: tuple[type[InvalidInputError], str] | None = None,
) -> None:
    """The value checks of the tensors in `pending` (ids, 2-D masks, packed position ids): a few small reductions,
    read at once."""
    parts: list[torch.Tensor] = []
    for name, tensor in pending:
        if name.endswith("input_ids"):
            parts.extend(torch.aminmax(tensor))
        elif name == "position_ids":
            starts = sequence_starts(tensor)
            parts.extend((tensor.min(), (starts & (tensor != 0)).any(), starts.sum()))
        else:
            parts.append(tensor.any(dim=-1).all())  # every row attends to a token
            if tensor.is_floating_point():
                parts.append(((tensor == 0) | (tensor == 1)).all())
    read = iter(_read(parts))
    for name, tensor in pending:
        if name.endswith("input_ids"):
            low, high = next(read), next(read)
            if low < 0 or (num_embeddings is not None and high >= num_embeddings):
                _raise_out_of_range(name, low, high, num_embeddings)
            continue
        if name == "position_ids":
            _check_packed_positions(tensor, *(next(read) for _ in range(3)), packing_refusal)
            continue
        every_row_attends = next(read)
        if tensor.is_floating_point() and not next(read):
            found = tensor[(tensor != 0) & (tensor != 1)][:3].tolist()
            raise InvalidInputError(
                f"{name} is a float mask holding values other than 0 and 1 (e.g. {found}): a 2-D mask says which "
                "tokens to attend (1) and which are padding (0). Pass a 0/1 mask (an additive or soft mask must be "
                "4-D)."
            )
        if not every_row_attends:
            rows = (~tensor.bool()).all(dim=-1).nonzero().flatten().tolist()
            shown = str(rows) if len(rows) <= 10 else f"{str(rows[:10])[:-1]}, ...] ({len(rows)} rows)"
            raise EmptySequenceError(
                f"Row(s) {shown} of {name} are all zeros, so those sequences have no token to attend to or score. "
                "Drop empty sequences from the batch."
            )


def _check_packed_positions(
    positions: torch.Tensor,
    low: int,
    bad_start: bool,
    num_sequences: int,
    packing_refusal: tuple[type[InvalidInputError], str] | None,
) -> None:
    if low < 0:
        raise InvalidPackedBatchError(
            f"position_ids holds the negative position {low}: a packed batch numbers each sequence's tokens from 0. "
            "Pack the batch with pack_batch (or DataCollatorWithFlattening with position_ids_start=0)."
        )
    if bad_start:
        starts = sequence_starts(positions)
        row, column = (starts & (positions != 0)).nonzero()[0].tolist()
        where = "starts" if column == 0 else f"restarts at column {column}"
        raise InvalidPackedBatchError(
            f"Row {row} of position_ids {where} at {positions[row, column].item()}, but a packed batch's sequences "
            "start at position 0 (a sequence starts wherever a position is not the previous one plus 1). Pack the "
            "batch with pack_batch (or DataCollatorWithFlattening with position_ids_start=0)."
        )
    if num_sequences > positions.shape[0] and packing_refusal is not None:
        error, message = packing_refusal
        raise error(message)


def _read(parts: list[torch.Tensor]) -> list:
    """The values of the 0-d tensors `parts`: read one by one on the CPU (no copy to make), else stacked and copied
    to the host at once (one device sync)."""
    if all(part.device.type == "cpu" for part in parts):
        return [part.item() for part in parts]
    device = parts[0].device
    return torch.stack([part.to(device) for part in parts]).tolist()  # bools and ints promote to one dtype


def _raise_out_of_range(name: str, low: int, high: int, num_embeddings: int | None) -> None:
    bad = low if low < 0 else high
    raise TokenIdOutOfRangeError(
        f"{name} holds the token id {bad}, outside the model's vocabulary (ids 0 to {num_embeddings - 1} of its input "
        f"embedding; the ids range from {low} to {high}): the ids come from another tokenizer, or the embeddings were "
        "not resized after tokens were added (model.resize_token_embeddings(len(tokenizer)))."
        if num_embeddings is not None
        else f"{name} holds the negative token id {bad}: token ids start at 0 (padding too: use the pad token's id, "
        "and the attention mask for what is padding)."
    )


def _num_embeddings(model: torch.nn.Module) -> int | None:
    """The number of rows of the input embedding (what the bare model's lookup accepts), `None` if unknown."""
    embedding = model.get_input_embeddings()
    count = getattr(embedding, "num_embeddings", None)
    if isinstance(count, int):
        return count
    weight = getattr(embedding, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
