"""Messages a daemon could not send while their connection stays up, tried again on a timer.

A ROUTER drops what it cannot route at once (the peer's queue is full, or it is
reconnecting), and a DEALER refuses a send past its queue's bound: without
this, a result or a barrier word lost that way is lost without a word. An
:class:`Outbox` keeps each one (at most ``limit``; the oldest is given up
first), tries it again every ``retry_s`` through the caller's ``send``, and
gives it up ``keep_s`` after it was first refused; whatever is given up is
returned to the caller, to be logged and counted where it is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvxferd.core.memory import Memory

K = TypeVar("K", bound=Hashable)
M = TypeVar("M")


@dataclass(slots=True)
class _Held(Generic[M]):
    dest: bytes | None
    message: M
    until: float


class Outbox(Generic[K, M]):
    def __init__(self, *, limit: int, retry_s: float, keep_s: float) -> None:
        self._held: Memory[K, _Held[M]] = Memory(limit=limit)
        self.retry_s, self.keep_s = retry_s, keep_s
        self._next: float | None = None
        self.given_up = 0
        self.delivered = 0

    def hold(self, key: K, dest: bytes | None, message: M, now: float) -> list[M]:
        """``message`` (to ``dest``) could not be sent: keep it; what the bound pushed out is returned."""
        pushed = self._held.put(key, _Held(dest, message, now + self.keep_s))
        if self._next is None:
            self._next = now + self.retry_s
        if pushed is None:
            return []
        self.given_up += 1
        return [pushed[1].message]

    def next_deadline(self) -> float | None:
        return self._next

    def retry(self, now: float, send: Callable[[bytes | None, M], bool]) -> list[M]:
        """Try every held message again (``send`` says whether it went); returns those given up."""
        if self._next is None or now < self._next:
            return []
        lost: list[M] = []
        for key, held in self._held.items():
            if send(held.dest, held.message):
                self._held.pop(key)
                self.delivered += 1
            elif now >= held.until:
                self._held.pop(key)
                self.given_up += 1
                lost.append(held.message)
        self._next = now + self.retry_s if len(self._held) else None
        return lost

    def __len__(self) -> int:
        return len(self._held)
