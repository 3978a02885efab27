"""Pure state of the barrier service: agreement per (group, key), never per count.

Theory of operation
-------------------
Ranks announce themselves with ``Hello`` (which fixes the group's size). For
each key (a request id, or a named barrier such as ``ready``) every rank says
exactly one thing: ``Arrive`` with a digest, or ``Withdraw`` with a status and
reason. When every rank of the group has spoken, every rank gets one verdict:
``Release`` if all arrived with equal digests, ``Diverged`` with each rank's
view otherwise. A key that is still open ``timeout_s`` after its first word
gets ``Expired`` naming the ranks never heard from, sent to every rank so that
the slow ones stop too (a named barrier's first arrival may set its own
timeout). An expired key is remembered for as long again, so a straggler
gets the same verdict at once instead of opening the key anew.

Repeating the same word is harmless; changing it is refused. Tables are
bounded (``max_keys`` open keys and as many remembered ones).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import Effect, Problem, ToRank
from kvxferd.protocol import (
    Ack,
    Arrive,
    Digest,
    Diverged,
    ErrorCode,
    Expired,
    Hello,
    Message,
    RankView,
    Release,
    Status,
    Withdraw,
)


@dataclass(slots=True)
class _Open:
    group: str
    key: str
    opened: float
    timeout_s: float
    words: dict[int, RankView] = field(default_factory=dict)


class BarrierState:
    def __init__(self, *, timeout_s: float = 30.0, max_keys: int = 65536, max_groups: int = 256) -> None:
        self.timeout_s = timeout_s
        self.max_keys = max_keys
        self.max_groups = max_groups
        self._groups: dict[str, int] = {}  # group -> world size
        self._open: dict[tuple[str, str], _Open] = {}
        self._expired: OrderedDict[tuple[str, str], tuple[Expired, float]] = OrderedDict()
        self._deadlines: Deadlines[tuple[str, str, str]] = Deadlines()  # (open | forget, group, key)

    def handle(self, msg: Message, now: float) -> list[Effect]:
        if isinstance(msg, Hello):
            return self.hello(msg)
        if isinstance(msg, Arrive):
            view = RankView(msg.rank, Status.OK, msg.digest)
            return self._word(msg.group, msg.key, view, now, msg.timeout_s or self.timeout_s)
        if isinstance(msg, Withdraw):
            view = RankView(msg.rank, msg.status, None, msg.reason)
            return self._word(msg.group, msg.key, view, now, self.timeout_s)
        return [Problem(ErrorCode.WRONG_ROLE, f"the barrier service does not accept {type(msg).__name__}")]

    def hello(self, msg: Hello) -> list[Effect]:
        size = self._groups.get(msg.group)
        if size is None:
            if len(self._groups) >= self.max_groups:
                return [Problem(ErrorCode.TABLE_FULL, f"group {msg.group!r} refused: {self.max_groups} groups known")]
            self._groups[msg.group] = msg.world_size
        elif size != msg.world_size:
            detail = f"group {msg.group!r} has world size {size}; rank {msg.rank} announced {msg.world_size}"
            return [Problem(ErrorCode.CONFLICT, detail, msg.group)]
        return [ToRank(msg.group, msg.rank, Ack("hello"))]

    def on_timer(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for kind, group, key in self._deadlines.pop_due(now):
            if kind == "forget":
                self._expired.pop((group, key), None)
                continue
            entry = self._open.pop((group, key))
            size = self._groups[group]
            missing = tuple(r for r in range(size) if r not in entry.words)
            verdict = Expired(group, key, missing, round(now - entry.opened, 3))
            self._remember(group, key, verdict, now, entry.timeout_s)
            effects += [ToRank(group, r, verdict) for r in range(size)]
        return effects

    def next_deadline(self) -> float | None:
        return self._deadlines.earliest()

    def sizes(self) -> dict[str, int]:
        return {"groups": len(self._groups), "open": len(self._open), "expired": len(self._expired)}

    # ---------------------------------------------------------------- internals

    def _word(self, group: str, key: str, view: RankView, now: float, timeout_s: float) -> list[Effect]:
        size = self._groups.get(group)
        if size is None:
            return [Problem(ErrorCode.NOT_REGISTERED, f"group {group!r} is unknown: send Hello first", key)]
        if view.rank >= size:
            return [Problem(ErrorCode.BAD_MESSAGE, f"rank {view.rank} is outside group {group!r} of {size}", key)]
        remembered = self._expired.get((group, key))
        if remembered is not None:
            return [ToRank(group, view.rank, remembered[0])]
        entry = self._open.get((group, key))
        if entry is None:
            if len(self._open) >= self.max_keys:
                detail = f"key {key!r} refused: {self.max_keys} keys already open"
                return [Problem(ErrorCode.TABLE_FULL, detail, key)]
            entry = self._open[(group, key)] = _Open(group, key, now, timeout_s)
            self._deadlines.set(("open", group, key), now + timeout_s)
        said = entry.words.get(view.rank)
        if said is not None:
            if said == view:
                return []
            detail = f"rank {view.rank} already said {said.describe()} about {key!r}; now {view.describe()}"
            return [Problem(ErrorCode.CONFLICT, detail, key)]
        entry.words[view.rank] = view
        if len(entry.words) < size:
            return []
        del self._open[(group, key)]
        self._deadlines.cancel(("open", group, key))
        views = tuple(entry.words[r] for r in range(size))
        digests = {v.digest for v in views}
        verdict: Message
        if len(digests) == 1 and None not in digests:
            (digest,) = digests
            assert isinstance(digest, Digest)
            verdict = Release(group, key, digest)
        else:
            verdict = Diverged(group, key, views)
        return [ToRank(group, r, verdict) for r in range(size)]

    def _remember(self, group: str, key: str, verdict: Expired, now: float, timeout_s: float) -> None:
        self._expired[(group, key)] = (verdict, now)
        self._deadlines.set(("forget", group, key), now + timeout_s)
        while len(self._expired) > self.max_keys:
            (g, k), _ = self._expired.popitem(last=False)
            self._deadlines.cancel(("forget", g, k))
