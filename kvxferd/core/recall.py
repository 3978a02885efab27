"""A bounded memory of recent facts about keys, each forgotten after a fixed time.

Theory of operation: a rank must remember a little about request instances it
does not hold: an Abort that came before its cache_info, and how an instance
ended (so a late message of it is dropped, not taken for something new). Such
memories must be bounded twice, in count and in time. Entries live in
insertion order in an ordered dict together with the time they are forgotten;
with one lifetime for every entry that order is also expiry order, so
forgetting only ever looks at the oldest end. Expiry times are rounded up to
whole ``granularity_s`` so a busy rank is woken to forget at most once per
granule, not once per entry. Full means the oldest entry makes room.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recall(Generic[K, V]):
    def __init__(self, *, ttl_s: float, limit: int, granularity_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.granularity_s = granularity_s
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V, now: float) -> K | None:
        """Remember ``value`` for ``key`` (again) from ``now``; returns the key forgotten to make room."""
        g = self.granularity_s
        until = math.ceil((now + self.ttl_s) / g) * g
        self._items[key] = (until, value)
        self._items.move_to_end(key)
        if len(self._items) > self.limit:
            old, _ = self._items.popitem(last=False)
            return old
        return None

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        return None if item is None else item[1]

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[1]

    def expire(self, now: float) -> int:
        """Forget every entry whose time has come; returns how many."""
        n = 0
        items = self._items
        while items:
            key, (until, _) = next(iter(items.items()))
            if until > now:
                break
            del items[key]
            n += 1
        return n

    def next_deadline(self) -> float | None:
        if not self._items:
            return None
        return next(iter(self._items.values()))[0]

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def values(self) -> list[V]:
        """Every value remembered, oldest first."""
        return [value for _, value in self._items.values()]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
