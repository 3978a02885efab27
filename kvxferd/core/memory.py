"""A bounded memory: facts about keys, kept within a count and (optionally) an age.

Theory of operation: every place that remembers something it does not own for
good (an abort that came before its cache_info, how an instance ended, the
notices a decode daemon handed on, the outcomes a client decided, ...) keeps
it here, so that each such memory is bounded twice, the same way everywhere:

* by **count**: at most ``limit`` entries; putting one more pushes the oldest
  out (oldest first: entries live in insertion order, and putting a key again
  moves it to the young end) and counts it in ``evicted``;
* by **age** (when ``ttl_s`` is set): an entry is forgotten ``ttl_s`` after it
  was last put, at the next :meth:`expire`, counted in ``expired``. With one
  lifetime for every entry, insertion order is also expiry order, so forgetting
  only ever looks at the oldest end. Expiry times are rounded up to whole
  ``granularity_s``, so a busy owner is woken to forget at most once per
  granule, not once per entry.

Nothing here reads a clock: ``now`` is an argument, and :meth:`next_deadline`
says when the owner should call :meth:`expire` next.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memory(Generic[K, V]):
    __slots__ = ("_items", "evicted", "expired", "granularity_s", "limit", "ttl_s")

    def __init__(self, *, limit: int, ttl_s: float | None = None, granularity_s: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"a memory must hold at least one entry, not {limit}")
        self.limit = limit
        self.ttl_s = ttl_s
        self.granularity_s = granularity_s
        self.evicted = 0  # entries pushed out by the count bound
        self.expired = 0  # entries forgotten by the age bound
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V, now: float = 0.0) -> tuple[K, V] | None:
        """Remember ``value`` for ``key`` (again) from ``now``; returns the entry pushed out to make
        room, if one was."""
        until = math.inf
        if self.ttl_s is not None:
            g = self.granularity_s
            until = math.ceil((now + self.ttl_s) / g) * g
        items = self._items
        items[key] = (until, value)
        items.move_to_end(key)
        if len(items) > self.limit:
            old, (_, old_value) = items.popitem(last=False)
            self.evicted += 1
            return old, old_value
        return None

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        return None if item is None else item[1]

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[1]

    def oldest(self) -> tuple[K, V] | None:
        """The entry that goes first, without removing it."""
        for key, (_, value) in self._items.items():
            return key, value
        return None

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Forget every entry whose time has come; returns them, oldest first."""
        gone = []
        items = self._items
        while items:
            key, (until, value) = next(iter(items.items()))
            if until > now:
                break
            del items[key]
            gone.append((key, value))
        self.expired += len(gone)
        return gone

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to forget (None: never, as things stand)."""
        for until, _ in self._items.values():
            return until if until != math.inf else None
        return None

    def clear(self) -> None:
        self._items.clear()

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def keys(self) -> list[K]:
        """Every key remembered, oldest first."""
        return list(self._items)

    def values(self) -> list[V]:
        """Every value remembered, oldest first."""
        return [value for _, value in self._items.values()]

    def items(self) -> list[tuple[K, V]]:
        """Every entry, oldest first."""
        return [(key, value) for key, (_, value) in self._items.items()]

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
