"""A set of deadlines keyed by object, with the earliest one at hand.

Theory of operation: a binary heap of ``(when, seq, key)`` plus a dict of each
key's current deadline. Moving or cancelling a deadline only updates the dict;
stale heap entries are skipped when they reach the top. ``earliest()`` drops
stale tops first, so the shell never wakes for a deadline that no longer
exists. Time is whatever float the caller passes; nothing here reads a clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator
from itertools import count
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._when: dict[K, float] = {}
        self._seq = count()

    def set(self, key: K, when: float) -> None:
        """Set (or move) the deadline of ``key``."""
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._when):
            self._compact()

    def cancel(self, key: K) -> None:
        self._when.pop(key, None)

    def earliest(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._when.get(key) == when:
                return when
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> Iterator[K]:
        """Yield, earliest first, every key whose deadline is at or before ``now``,
        removing it. Keys set again while iterating are seen only if due."""
        while True:
            when = self.earliest()
            if when is None or when > now:
                return
            _, _, key = heapq.heappop(self._heap)
            del self._when[key]
            yield key

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def _compact(self) -> None:
        self._heap = [(when, seq, key) for when, seq, key in self._heap if self._when.get(key) == when]
        heapq.heapify(self._heap)
