"""Variable-length (varlen) attention on any device: `attn_implementation="vhead_sdpa_varlen"`.

transformers keeps the sequences of a packed row apart under sdpa with one dense `(T, T)` block-diagonal mask, so
attention over the row costs `T**2`. This implementation runs a packed call as one causal
`scaled_dot_product_attention` per sequence instead (`sum(length**2)`), as flash-attn's varlen kernels do on GPU, and
is exactly transformers' sdpa (its `sdpa_attention_forward`, its `sdpa_mask`) for every other call: a model loaded
with it gives bit-identical results to sdpa on ordinary batches.

A call is packed when the model passes the sequence boundaries down to the attention function, as `cu_seq_lens_q` /
`cu_seq_lens_k` (the FlashAttentionKwargs of [`pack_batch`] and `DataCollatorWithFlattening(return_flash_attn_kwargs=
True)`) or else as the `position_ids` restarting at 0 (transformers' rule: a sequence starts wherever a position id is
not the previous one plus 1), and the mask transformers built agrees: a boolean `(1, 1, T, T)` mask whose diagonal is
set, whose entries just above the diagonal are not, and whose entries just below it are not exactly where a sequence
starts. Anything else runs the dense sdpa path, which is always right: a family whose attention gets no boundaries,
a cache, softcapping, attention sinks, a position bias (ALiBi in the mask), a non-causal module, `torch.compile`.

The mask interface gets no position ids, so it cannot tell a packed call whose attention will get the boundaries from
one whose attention will not: the mask is still built (densely, once per forward and mask type), and ignored by a
packed call. Within a sequence, the causal mask becomes `is_causal=True`; any other pattern there (a sliding window)
is the sequence's diagonal block of that mask.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .packing import sequence_starts

ATTN_IMPLEMENTATION = "vhead_sdpa_varlen"

# keyword arguments of an attention call that the varlen path does not implement: such a call runs the dense path
_DENSE_ONLY = ("softcap", "s_aux", "sinks", "position_bias", "cache", "past_key_values")


def register_varlen_attention() -> None:
    """Registers [`sdpa_varlen_attention_forward`] with transformers' `AttentionInterface`, and sdpa's mask under the
    same name with its `AttentionMaskInterface`. Idempotent; importing `transformers_vhead` calls it."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` `(1, heads, T, head_dim)`, `key` and `value`
    `(1, kv_heads, T, head_dim)`; returns `(1, T, heads, head_dim)` and no weights. One causal sdpa per packed
    sequence; transformers' `sdpa_attention_forward` for any call that is not packed (see the module docstring)."""
    packed = _packed_call(module, query, key, attention_mask, is_causal, kwargs)
    if packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds, full_causal = packed
    groups = getattr(module, "num_key_value_groups", 1)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # a causal block is `is_causal`; any other (a sliding window shorter than the sequence) is the mask's block
        block = None if full_causal else attention_mask[:, :, start:end, start:end]
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        gqa = {}
        if groups > 1:
            if use_gqa_in_sdpa(block, k, v):
                gqa["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        output = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=block, dropout_p=dropout, scale=scaling, is_causal=full_causal, **gqa
        )
        outputs.append(output)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _packed_call(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[list[int], bool] | None:
    """For a packed call, where its sequences start (then `T`) and whether the mask is causal within each of them
    (every token sees its sequence's first token: no sliding window shorter than the sequence); `None` for a call
    to run dense."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    total = query.shape[2]
    if (
        not causal
        or torch.compiler.is_compiling()
        or any(kwargs.get(name) is not None for name in _DENSE_ONLY)
        or query.shape[0] != 1
        or key.shape[2] != total
        or not isinstance(attention_mask, torch.Tensor)
        or attention_mask.dtype != torch.bool
        or attention_mask.shape != (1, 1, total, total)
    ):
        return None
    cu_seq_lens = _given_boundaries(kwargs, total)
    if cu_seq_lens is None or cu_seq_lens.shape[0] < 3:  # one sequence: the dense path is the same attention
        return None
    mask, device = attention_mask[0, 0], attention_mask.device
    cu_seq_lens = cu_seq_lens.to(device)
    index = torch.arange(total, device=device)
    starts = torch.zeros(total, dtype=torch.bool, device=device)
    starts[cu_seq_lens[:-1]] = True
    agrees = (
        mask[index, index].all()
        & ~mask[index[:-1], index[1:]].any()
        & (mask[index[1:], index[:-1]] != starts[1:]).all()
    )
    first = torch.where(starts, index, 0).cummax(0).values  # each token's sequence's first token
    checks = torch.stack([agrees, mask[index, first].all()]).tolist()  # one device sync
    return (cu_seq_lens.tolist(), checks[1]) if checks[0] else None


def _given_boundaries(kwargs: dict[str, Any], total: int) -> torch.Tensor | None:
    """The cumulative lengths the model passed down: `cu_seq_lens_q` (equal to `cu_seq_lens_k`), else from
    `position_ids`; `None` if neither describes a row of `total` tokens."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        if cu_q.dim() != 1 or cu_q.shape[0] < 2 or cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k):
            return None
        cu_seq_lens = cu_q.long()
        valid = (cu_seq_lens[0] == 0) & (cu_seq_lens[-1] == total) & (cu_seq_lens.diff() > 0).all()
        return cu_seq_lens if valid.item() else None
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.shape[-1] != total or positions.numel() != total:
        return None
    starts = sequence_starts(positions.reshape(1, total))[0]
    return torch.cat([starts.nonzero().flatten(), positions.new_tensor([total])])
