"""The final hidden state of a decoder stack, read by a forward hook instead of `output_hidden_states=True`.

Only the one tensor the heads need is kept; and a call that needs no logits stops the forward right after the decoder,
so the LM head never runs.

The hook is registered once per decoder and stays; a call turns it on for itself through a context variable (each
thread and each asyncio task has its own), as transformers' own output capturing does. Nothing is registered or
removed per call, which torch.compile could not trace (a graph break on each side of the decoder).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn


class _StopAfterDecoder(Exception):
    """Raised by the decoder hook of a call that needs no logits: what follows the decoder (the LM head) is skipped."""


class _Capture:
    """What one call collects: the decoder it reads, whether to stop there, the hidden states seen."""

    __slots__ = ("decoder", "hidden_states", "stop")

    def __init__(self, decoder: nn.Module, stop: bool):
        self.decoder = decoder
        self.stop = stop
        self.hidden_states: list[torch.Tensor] = []


class _ActiveCapture:
    """The capture of the call in progress: a context variable in eager mode. Dynamo cannot trace `ContextVar` (a
    graph break, an error under `fullgraph=True`), so:

    - in a call of ours that torch.compile traces, it is a plain attribute, as in transformers' own output capturing
      (compiled calls from several threads at once are then not kept apart);
    - a compiled model with the hook on its decoder, run while no eager call of ours is in progress (the bare model, or
      transformers' compiled forward of a static-cache `generate`), finds nothing to capture without reading it;
    - a compiled decoder inside an eager call of ours reads it (a graph break there), and finds that call's capture.
    """

    def __init__(self):
        self._var: ContextVar[_Capture | None] = ContextVar("transformers_vhead_capture", default=None)
        self._traced: _Capture | None = None
        self._compiling = False
        self._eager_calls = 0  # eager calls of ours in progress, in every thread
        self._lock = threading.Lock()

    def get(self) -> _Capture | None:
        if self._compiling:
            return self._traced
        if self._eager_calls == 0:
            return None
        return self._var.get()

    def set(self, capture: _Capture):
        if torch.compiler.is_compiling():
            self._traced, self._compiling = capture, True
            return None
        with self._lock:
            self._eager_calls += 1
        return self._var.set(capture)

    def reset(self, token) -> None:
        if token is None:
            self._traced, self._compiling = None, False
            return
        self._var.reset(token)
        with self._lock:
            self._eager_calls -= 1


_active = _ActiveCapture()


def _hook(module: nn.Module, args: Any, output: Any) -> None:
    capture = _active.get()
    if capture is None or capture.decoder is not module:  # no call of ours, or one reading another decoder
        return
    hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__} without a last_hidden_state.")
    capture.hidden_states.append(hidden)
    if capture.stop:
        raise _StopAfterDecoder


def install_capture_hook(decoder: nn.Module) -> None:
    """Puts the (idle) capturing hook on `decoder`, once (a deep copy of the decoder has it too). The value-head model
    does it when it is built, so that a compiled first call finds it there."""
    if not any(hook is _hook for hook in decoder._forward_hooks.values()):
        decoder.register_forward_hook(_hook)


@contextmanager
def final_hidden_state(decoder: nn.Module, stop: bool) -> Iterator[list[torch.Tensor]]:
    """Collects the decoder's `last_hidden_state` during the block (only this thread's, this task's calls); with
    `stop`, ends the forward as soon as the decoder has run, and the block's remaining statements are skipped.

    Args:
        decoder: the decoder stack (`model.get_decoder()`).
        stop: end the forward as soon as the decoder has run.

    Yields:
        The list the hidden states are appended to, one per decoder call.
    """
    install_capture_hook(decoder)
    capture = _Capture(decoder, stop)
    token = _active.set(capture)
    try:
        yield capture.hidden_states
    except _StopAfterDecoder:
        pass
    finally:
        _active.reset(token)
