"""The outputs of the value-head models: transformers' own LM outputs plus `value`, unpacking like TRL's tuples.

They subclass the installed transformers' `CausalLMOutputWithPast` and `Seq2SeqLMOutput`, so the cache field has the
name transformers gives it there (`cache` from 5.24, `past_key_values` before), and the other name reads the same
field, without a deprecation warning: TRL-era code reads `output.past_key_values`, code written for 5.24+ reads
`output.cache`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput

from .compat import CACHE_NAME, OTHER_CACHE_NAME


def _field_name(key: Any) -> Any:
    return CACHE_NAME if key == OTHER_CACHE_NAME else key


class _TRLTuple:
    """Unpacking, `len` and integer indexing follow TRL's tuple, `(logits, loss, value)` (plus the cache with
    `return_past_key_values=True`), with `None` kept in its place: `logits, loss, value = model(**inputs)` works with or
    without labels. Attributes and string keys work as on any `ModelOutput`, under either name of the cache."""

    _trl_fields: ClassVar[tuple[str, ...]] = ("logits", "loss", "value")

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(getattr(self, name) for name in self._trl_fields))

    def __len__(self) -> int:
        return len(self._trl_fields)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(_field_name(key))
        return tuple(self)[key]

    def __contains__(self, key) -> bool:
        return super().__contains__(_field_name(key))

    def get(self, key, default=None):
        return super().get(_field_name(key), default)


# Set after the class body: a property under the cache field's own name would hide the field.
setattr(
    _TRLTuple,
    OTHER_CACHE_NAME,
    property(lambda self: getattr(self, CACHE_NAME), doc=f"The cache, under its other name (`{CACHE_NAME}`)."),
)
_WITH_CACHE = ("logits", "loss", "value", CACHE_NAME)


@dataclass
class CausalLMOutputWithValue(_TRLTuple, CausalLMOutputWithPast):
    """Output of [`AutoModelForCausalLMWithValueHead`]: transformers' `CausalLMOutputWithPast` plus the values.

    Args:
        loss: the LM loss, when `labels` were given.
        logits: LM logits `(batch, seq, vocab)`, fp32 unless `config.upcast_logits` is False; `None` from a value-only
            call.
        cache / past_key_values: the cache, when one was used (the field has the installed transformers' name; the
            other name reads it too).
        hidden_states, attentions: as the wrapped model returns them, when asked for.
        value: fp32 values `(batch, seq)`.
    """

    value: torch.FloatTensor | None = None


@dataclass
class CausalLMOutputWithValueAndPast(CausalLMOutputWithValue):
    """[`CausalLMOutputWithValue`] that unpacks to `(logits, loss, value, cache)` (`return_past_key_values=True`)."""

    _trl_fields: ClassVar[tuple[str, ...]] = _WITH_CACHE


@dataclass
class Seq2SeqLMOutputWithValue(_TRLTuple, Seq2SeqLMOutput):
    """Output of [`AutoModelForSeq2SeqLMWithValueHead`]: transformers' `Seq2SeqLMOutput` plus the values, one per
    decoder position; the fields as in [`CausalLMOutputWithValue`]."""

    value: torch.FloatTensor | None = None


@dataclass
class Seq2SeqLMOutputWithValueAndPast(Seq2SeqLMOutputWithValue):
    """[`Seq2SeqLMOutputWithValue`] that unpacks to `(logits, loss, value, cache)` (`return_past_key_values=True`)."""

    _trl_fields: ClassVar[tuple[str, ...]] = _WITH_CACHE
