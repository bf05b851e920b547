"""The lock between a model's adapter switches and its calls, shared by calls, exclusive for switches."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

import torch


class AdapterLock:
    """A model's lock between its adapter switches and its calls: a switch of the active adapter or of the modes
    (scoring, `as_reference`) holds it alone (`with lock:`); each forward and `generate` holds it shared
    (`with lock.shared():`). So a call never runs with another thread's switch in effect, while calls in several
    threads (or `nn.DataParallel`'s replicas, which share it) still run at once.

    Both ways are re-entrant within a thread: a forward inside a switch (scoring runs one) and a call inside a call
    never wait. A switch asked for inside a call of the same thread (a hook or logits processor that scores) gives up
    that thread's shared hold while it waits for the other threads' calls to end; the paused call computes nothing
    meanwhile, and every switch puts back what it changed, so the call goes on with what it started with. New calls
    wait behind a waiting switch, so switches are not starved.

    A deep copy or a pickle of the model gets a fresh lock (a thread lock itself can be neither copied nor
    pickled)."""

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._owner: int | None = None  # the thread holding it alone
        self._depth = 0  # how many times the owner holds it
        self._shared: dict[int, int] = {}  # thread -> how many shared holds it has
        self._given_up: dict[int, int] = {}  # thread -> shared holds it gave up to switch
        self._waiting = 0  # switches waiting

    def __enter__(self) -> AdapterLock:
        me = threading.get_ident()
        with self._condition:
            if self._owner == me:
                self._depth += 1
                return self
            held = self._shared.pop(me, 0)
            if held:
                self._given_up[me] = held
                self._condition.notify_all()
            self._waiting += 1
            try:
                while self._owner is not None or self._shared:
                    self._condition.wait()
            except BaseException:  # interrupted while waiting: the call unwinding keeps its holds to release
                if held:
                    self._shared[me] = self._given_up.pop(me)
                raise
            finally:
                self._waiting -= 1
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc_info) -> None:
        me = threading.get_ident()
        with self._condition:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            held = self._given_up.pop(me, 0)
            if held:  # the call that asked for the switch holds it shared again (nobody holds it alone now)
                self._shared[me] = held
            self._condition.notify_all()

    def shared(self) -> AbstractContextManager:
        """A shared hold for a `with` block (a forward, `generate`), or while torch.compile traces a no-op: dynamo can
        trace neither a thread lock nor a context manager made outside the traced code (a compiled call is then not
        kept apart from a switch in another thread)."""
        return nullcontext() if torch.compiler.is_compiling() else _SharedHold(self)

    def _acquire_shared(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._owner != me and me not in self._shared:  # a nested hold never waits
                while self._owner is not None or self._waiting:
                    self._condition.wait()
            self._shared[me] = self._shared.get(me, 0) + 1

    def _release_shared(self) -> None:
        me = threading.get_ident()
        with self._condition:
            left = self._shared[me] - 1
            if left:
                self._shared[me] = left
            else:
                del self._shared[me]
                self._condition.notify_all()

    def __deepcopy__(self, memo: dict) -> AdapterLock:
        return AdapterLock()

    def __reduce__(self):
        return AdapterLock, ()


class _SharedHold:
    """`with lock.shared():`."""

    __slots__ = ("_lock",)

    def __init__(self, lock: AdapterLock):
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_shared()

    def __exit__(self, *exc_info) -> None:
        self._lock._release_shared()
