"""The final hidden state of a decoder stack, read by a forward hook instead of `output_hidden_states=True`.

Only the one tensor the heads need is kept; and a call that needs no logits stops the forward right after the decoder,
so the LM head never runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _StopAfterDecoder(Exception):
    """Raised by the decoder hook of a call that needs no logits: what follows the decoder (the LM head) is skipped."""


@contextmanager
def final_hidden_state(decoder: nn.Module, stop: bool) -> Iterator[list[torch.Tensor]]:
    """Collects the decoder's `last_hidden_state` during the block (only this thread's calls); with `stop`, ends the
    forward right there, and the block's remaining statements are skipped.

    Args:
        decoder: the decoder stack (`model.get_decoder()`).
        stop: end the forward as soon as the decoder has run.

    Yields:
        The list the hidden states are appended to, one per decoder call.
    """
    captured: list[torch.Tensor] = []
    thread = threading.get_ident()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != thread:
            return
        hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__} without a last_hidden_state.")
        captured.append(hidden)
        if stop:
            raise _StopAfterDecoder

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    except _StopAfterDecoder:
        pass
    finally:
        handle.remove()
