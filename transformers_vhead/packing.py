"""Padding-free (packed) batches: several sequences concatenated in one row, told apart by `position_ids` that restart
at 0 for each sequence and no attention mask, as transformers' `DataCollatorWithFlattening` makes them.

transformers builds the block-diagonal mask of such a batch from the position ids (`find_packed_sequence_indices` in
`masking_utils`: a sequence starts wherever a position id is not the previous one plus 1), when there is no attention
mask and no cache. [`pack_batch`] packs a padded batch that way, and [`PackedBatch.unpack`] puts per-token results
back into the padded layout. Under sdpa and eager that mask is dense, `(T, T)` for the whole row: packing saves the
per-token work of the padding (projections, MLPs, the LM head) but attention costs `T**2` instead of `batch * seq**2`.
A packed batch also carries the sequence boundaries as FlashAttentionKwargs (`cu_seq_lens_q`, `cu_seq_lens_k`,
`max_length_q`, `max_length_k`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes them), which
flash-attn's varlen kernels and our `attn_implementation="vhead_sdpa_varlen"` (`varlen_attention`) use to attend
within each sequence only, at `sum(length**2)`; sdpa and eager ignore them.

The architectures that cannot keep packed sequences apart are listed in `UNSUPPORTED_MODEL_TYPES`, with the reason;
a packed batch of several sequences is refused for them (`PackedBatchNotSupportedError`) before anything runs.
`tests/test_packing.py` checks that each one listed really gives other values packed, and that the others match.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .compat import causal_mask_ignores_position_ids
from .errors import EmptySequenceError, InvalidInputError

_ACROSS = "so its tokens would attend to the other sequences of the row"

# model_type -> why a packed batch gives wrong values (each checked by tests/test_packing.py)
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bloom": f"its forward takes no position_ids (ALiBi is built from the attention mask), {_ACROSS}",
    "mpt": f"its forward takes no position_ids (ALiBi is built from the attention mask), {_ACROSS}",
    "opt": f"its learned positions read position_ids but its causal mask is built without them, {_ACROSS}",
}
ENCODER_DECODER_REASON = (
    f"an encoder-decoder model takes no position_ids and its encoder attends in both directions, {_ACROSS}"
)
CACHE_KEYS = ("past_key_values", "cache")  # the cache under either name (see `compat.CACHE_NAME`)


def unsupported_reason(config: Any) -> str | None:
    """Why a model of `config` (the wrapped model's) cannot run a packed batch; `None` if it can: the table, and a
    family whose installed release builds its causal mask without the position ids (Falcon before 5.24)."""
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER_REASON
    model_type = getattr(config, "model_type", None)
    reason = UNSUPPORTED_MODEL_TYPES.get(model_type)
    if reason is None and isinstance(model_type, str) and causal_mask_ignores_position_ids(model_type):
        reason = f"in this transformers release its causal mask is built without the position ids, {_ACROSS}"
    return reason


def is_packed_form(inputs: Mapping[str, Any]) -> bool:
    """Whether `inputs` take the packed form transformers recognises: `position_ids` and no attention mask, no cache.
    (It is a packed batch if the position ids restart within a row; one unpadded sequence has this form too.)"""
    return (
        isinstance(inputs.get("position_ids"), torch.Tensor)
        and inputs.get("attention_mask") is None
        and all(inputs.get(key) is None for key in CACHE_KEYS)
    )


def sequence_starts(position_ids: torch.Tensor) -> torch.BoolTensor:
    """`(rows, T)`: where a sequence starts, by transformers' rule (the first column, and wherever a position id is
    not the previous one plus 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=-1) != 1
    return starts


def last_token_positions(position_ids: torch.Tensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The (row, column) of each packed sequence's last token, sequences in order (row by row)."""
    ends = torch.ones_like(position_ids, dtype=torch.bool)
    ends[:, :-1] = sequence_starts(position_ids)[:, 1:]
    rows, columns = ends.nonzero(as_tuple=True)
    return rows, columns


@dataclass(eq=False)
class PackedBatch(Mapping):
    """A padded batch packed into one row without padding, and what it takes to unpack results.

    A `Mapping` of `input_ids`, `position_ids` and the FlashAttentionKwargs (`cu_seq_lens_q` and `cu_seq_lens_k`,
    both `cu_seq_lens`; `max_length_q` and `max_length_k`, both `max_length`), like transformers' `BatchEncoding` and
    its collators' batches, so it goes straight into a call: `model(**packed)`, `model.compute_values(**packed)`,
    `model.compute_sequence_scores(**packed)`. (Every supported family's forward takes the FlashAttentionKwargs; those
    whose attention does not use them drop them.)

    Args:
        input_ids: `(1, T)` the tokens of every sequence, one after the other (`T` = the number of attended tokens).
        position_ids: `(1, T)` each token's position in its sequence, restarting at 0 for each sequence.
        cu_seq_lens: `(num_sequences + 1,)` int32, where each sequence starts in the row, then `T`.
        max_length: the length of the longest sequence.
        lengths: `(num_sequences,)` the length of each sequence, in the order of the batch's rows.
        shape: `(batch, seq)`, the shape of the padded batch.
        token_index: `(T,)` where each packed token was in the padded batch, as an index into its flattened
            `(batch * seq)` layout.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    lengths: torch.LongTensor
    shape: tuple[int, int]
    token_index: torch.LongTensor
    cu_seq_lens: torch.IntTensor
    max_length: int

    # key of the call -> attribute
    _KEYS = {
        "input_ids": "input_ids",
        "position_ids": "position_ids",
        "cu_seq_lens_q": "cu_seq_lens",
        "cu_seq_lens_k": "cu_seq_lens",
        "max_length_q": "max_length",
        "max_length_k": "max_length",
    }

    def __getitem__(self, key: str) -> torch.Tensor | int:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, self._KEYS[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    @property
    def num_sequences(self) -> int:
        return self.lengths.shape[0]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch on `device` (as `BatchEncoding.to`)."""
        tensors = ("input_ids", "position_ids", "lengths", "token_index", "cu_seq_lens")
        moved = {name: getattr(self, name).to(device) for name in tensors}
        return PackedBatch(shape=self.shape, max_length=self.max_length, **moved)

    def unpack(self, tensor: torch.Tensor, fill: float | int = 0, *, next_token: bool = False) -> torch.Tensor:
        """A result of the packed batch in the padded batch's layout, `fill` where the padded batch had padding.

        Args:
            tensor: a per-token result `(1, T)` or `(1, T, ...)` (values, logits, token scores); with
                `next_token=True`, a next-token result `(1, T - 1)` or `(1, T - 1, ...)` whose entry `t` is about
                token `t + 1` given the tokens up to `t` (log-probs, as `compute_logprobs` and `next_token_logprobs`
                give them).
            fill: the value of the padded positions (and, with `next_token`, of those without a next token).
            next_token: whether `tensor` is a next-token result. Its entries whose token `t + 1` starts another
                sequence cross a boundary and mean nothing: they are dropped.

        Returns:
            `(batch, seq, ...)`, or with `next_token` `(batch, seq - 1, ...)`: entry `j` of row `b` is what the padded
            computation gives there. Differentiable in `tensor`.

        Raises:
            InvalidInputError: `tensor` is not `(1, T, ...)` (`(1, T - 1, ...)` with `next_token`).
        """
        total = self.input_ids.shape[1]
        expected = total - 1 if next_token else total
        if tensor.dim() < 2 or tensor.shape[0] != 1 or tensor.shape[1] != expected:
            kind, hint = ("next-token", "leave next_token off") if next_token else ("per-token", "pass next_token=True")
            raise InvalidInputError(
                f"PackedBatch.unpack got a tensor of shape {tuple(tensor.shape)}, but a {kind} result of this batch "
                f"(T={total} tokens) is (1, {expected}, ...). For a {'per-token' if next_token else 'next-token'} "
                f"result, (1, {total if next_token else total - 1}, ...), {hint}."
            )
        batch, seq = self.shape
        source, index = tensor[0], self.token_index.to(tensor.device)
        if next_token:
            positions = self.position_ids[0].to(tensor.device)
            continues = (positions[1:] != 0).nonzero().squeeze(-1)  # token t + 1 is in token t's sequence
            rows, columns = index[continues] // seq, index[continues] % seq
            source, index, seq = source[continues], rows * (seq - 1) + columns, seq - 1
        out = source.new_full((batch * seq, *source.shape[1:]), fill)
        return out.index_copy(0, index, source).view(batch, seq, *source.shape[1:])

    def split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A per-token result `(1, T, ...)` cut into one tensor per sequence, `(length, ...)` each, in the order of
        the batch's rows. (Per-sequence results such as `compute_sequence_scores`' are already in that order.)"""
        return torch.split(tensor[0], self.lengths.tolist())


def pack_batch(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> PackedBatch:
    """Packs a padded batch (left, right or mixed padding) into one row without padding.

    Args:
        input_ids: `(batch, seq)` token ids.
        attention_mask: `(batch, seq)`, 1 for tokens and 0 for padding; each row's tokens one block (no holes).
            `None` means no padding.

    Returns:
        [`PackedBatch`]: `input_ids` and `position_ids` `(1, T)` and the FlashAttentionKwargs for the call, and
        `unpack` / `split` for the results.

    Raises:
        InvalidInputError: ids that are not 2-D, a mask of another shape, or a row whose tokens are not one block.
        EmptySequenceError: a row of the mask is all zeros.

    Example:

    ```python
    packed = pack_batch(input_ids, attention_mask)
    values = packed.unpack(model.compute_values(**packed))  # (batch, seq), 0 at the padding
    ```
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InvalidInputError(f"pack_batch takes input_ids of shape (batch, seq), got {shape}.")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    elif attention_mask.shape != input_ids.shape:
        raise InvalidInputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but input_ids {tuple(input_ids.shape)}: pass the "
            "mask that was built with these ids."
        )
    else:
        mask = attention_mask.to(input_ids.device).bool()
    batch, seq = input_ids.shape
    lengths = mask.sum(-1)
    first = mask.int().argmax(-1)
    last = seq - 1 - mask.flip(-1).int().argmax(-1)
    empty, holes = (lengths == 0).any().item(), (lengths != last - first + 1).any().item()
    if empty:
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise EmptySequenceError(
            f"Row(s) {rows} of the attention mask are all zeros: there is no token to pack. Drop empty sequences."
        )
    if holes:
        rows = (lengths != last - first + 1).nonzero().flatten().tolist()
        raise InvalidInputError(
            f"Row(s) {rows} of the attention mask have holes (zeros between ones): packing would join the tokens "
            "around them. Pack left- or right-padded rows, or pass the 4-D mask of such a batch to the model instead."
        )
    flat = mask.flatten()
    token_index = flat.nonzero().squeeze(-1)
    positions = (mask.cumsum(-1) - 1).flatten()[token_index]
    return PackedBatch(
        input_ids=input_ids.flatten()[token_index][None],
        position_ids=positions[None],
        lengths=lengths,
        shape=(batch, seq),
        token_index=token_index,
        cu_seq_lens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        max_length=int(lengths.max()),
    )
