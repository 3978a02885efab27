"""Messages between prefill daemons and the barrier service of their TP group.

Agreement is per *key* (a request id, or the name of a blocking barrier such
as ``ready``), never per count. A rank ends its part in a key with exactly one
:class:`Arrive` (it did its share; the digest says what) or :class:`Withdraw`
(it will not, and why). The service answers every rank of the group with one
verdict: :class:`Release` (all arrived, digests agree), :class:`Diverged` (all
spoke but they disagree, or someone withdrew) or :class:`Expired` (the
deadline passed; the missing ranks are named).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvxferd.protocol import fields as f
from kvxferd.protocol.base import ROLES, Message, Status, Struct, store

#: Statuses a rank may withdraw with.
WITHDRAW_STATUSES = (Status.FAILED.value, Status.ABORTED.value)


@dataclass(frozen=True, slots=True)
class Digest(Struct):
    """What one rank did for a key: layers, blocks and bytes written, and a
    fingerprint of the request's shape (blocks, chunk boundaries).

    Equal digests across ranks mean the ranks did the same job. Wire:
    ``[32, 13, 27262976, "9f2c3b1a0e4d5c6b"]``.
    """

    layers: int
    blocks: int
    bytes: int
    fingerprint: str

    def __post_init__(self) -> None:
        f.uint("Digest", "layers", self.layers)
        f.uint("Digest", "blocks", self.blocks)
        f.uint("Digest", "bytes", self.bytes)
        f.text("Digest", "fingerprint", self.fingerprint, limit=128)

    def describe(self) -> str:
        return f"{self.layers} layers, {self.blocks} blocks, {self.bytes} B, fp {self.fingerprint}"


@dataclass(frozen=True, slots=True)
class RankView(Struct):
    """One rank's word in a :class:`Diverged` verdict: its digest, or how and why it withdrew.

    ``status`` is ``ok`` for a rank that arrived (then ``digest`` is set),
    ``failed`` or ``aborted`` for one that withdrew (then ``reason`` says why).
    Wire: ``[1, "aborted", null, "client cancelled"]`` or ``[0, "ok", [32, 13, ...], ""]``.
    """

    NESTED: ClassVar[dict[str, object]] = {"digest": Digest}

    rank: int
    status: Status
    digest: Digest | None
    reason: str = ""

    def __post_init__(self) -> None:
        f.uint("RankView", "rank", self.rank)
        f.choice("RankView", "status", self.status, tuple(Status))
        store(self, "status", Status(self.status))
        if self.status is Status.OK:
            if not isinstance(self.digest, Digest):
                raise f.fail("RankView", "digest", "a rank that arrived must carry its Digest")
        elif self.digest is not None:
            raise f.fail("RankView", "digest", "a rank that withdrew carries no digest")
        f.text("RankView", "reason", self.reason)
        if self.status is not Status.OK and not self.reason:
            raise f.fail("RankView", "reason", "a rank that withdrew must say why")

    def describe(self) -> str:
        if self.digest is None:
            return f"rank {self.rank} {self.status} ({self.reason})"
        return f"rank {self.rank}: {self.digest.describe()}"


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Rank→service: announce a rank of a group and the group's size. Answered with Ack.

    Wire: ``[1, "hello", "prefill", 0, 2, "prefill"]``.
    """

    TAG: ClassVar[str] = "hello"

    group: str
    rank: int
    world_size: int
    role: str

    def __post_init__(self) -> None:
        f.name("Hello", "group", self.group)
        f.uint("Hello", "world_size", self.world_size, low=1, high=4096)
        f.uint("Hello", "rank", self.rank, high=self.world_size - 1)
        f.choice("Hello", "role", self.role, ROLES)


@dataclass(frozen=True, slots=True)
class Arrive(Message):
    """Rank→service: this rank finished its part of ``key``. Never blocks the rank.

    ``timeout_s`` (named barriers such as start-up) sets how long the key may
    stay open if this arrival opens it; 0 means the service's default.
    Wire: ``[1, "arrive", "prefill", "req-7", 1, [32, 13, 27262976, "9f2c..."], 0.0]``.
    """

    TAG: ClassVar[str] = "arrive"
    NESTED: ClassVar[dict[str, object]] = {"digest": Digest}

    group: str
    key: str
    rank: int
    digest: Digest
    timeout_s: float = 0.0

    def __post_init__(self) -> None:
        f.name("Arrive", "group", self.group)
        f.name("Arrive", "key", self.key)
        f.uint("Arrive", "rank", self.rank)
        if not isinstance(self.digest, Digest):
            raise f.fail("Arrive", "digest", "expected a Digest")
        store(self, "timeout_s", f.number("Arrive", "timeout_s", self.timeout_s))


@dataclass(frozen=True, slots=True)
class Withdraw(Message):
    """Rank→service: this rank will not complete ``key`` (aborted, failed, timed out).

    Sent only once the rank has no write for the key in flight, so a verdict
    that follows means no rank is still writing. ``status`` is ``failed`` or
    ``aborted``. Wire: ``[1, "withdraw", "prefill", "req-7", 1, "aborted",
    "client cancelled"]``.
    """

    TAG: ClassVar[str] = "withdraw"

    group: str
    key: str
    rank: int
    status: Status
    reason: str

    def __post_init__(self) -> None:
        f.name("Withdraw", "group", self.group)
        f.name("Withdraw", "key", self.key)
        f.uint("Withdraw", "rank", self.rank)
        f.choice("Withdraw", "status", self.status, WITHDRAW_STATUSES)
        store(self, "status", Status(self.status))
        f.text("Withdraw", "reason", self.reason, empty=False)


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Service→ranks: every rank arrived at ``key`` with the same digest.

    Wire: ``[1, "release", "prefill", "req-7", [32, 13, 27262976, "9f2c..."]]``.
    """

    TAG: ClassVar[str] = "release"
    NESTED: ClassVar[dict[str, object]] = {"digest": Digest}

    group: str
    key: str
    digest: Digest

    def __post_init__(self) -> None:
        f.name("Release", "group", self.group)
        f.name("Release", "key", self.key)
        if not isinstance(self.digest, Digest):
            raise f.fail("Release", "digest", "expected a Digest")


@dataclass(frozen=True, slots=True)
class Diverged(Message):
    """Service→ranks: every rank spoke about ``key`` but not in agreement.

    ``views`` holds each rank's digest or withdrawal. Wire: ``[1, "diverged",
    "prefill", "req-7", [[0, "ok", [...], ""], [1, "aborted", null, "client cancelled"]]]``.
    """

    TAG: ClassVar[str] = "diverged"
    NESTED: ClassVar[dict[str, object]] = {"views": [RankView]}

    group: str
    key: str
    views: tuple[RankView, ...]

    def __post_init__(self) -> None:
        f.name("Diverged", "group", self.group)
        f.name("Diverged", "key", self.key)
        store(self, "views", f.items_of("Diverged", "views", self.views, RankView, limit=4096))

    def describe(self) -> str:
        return "; ".join(v.describe() for v in self.views)

    @property
    def status(self) -> Status:
        """ABORTED if any rank withdrew because of an abort, else FAILED: the same on every rank."""
        aborted = any(v.status is Status.ABORTED for v in self.views)
        return Status.ABORTED if aborted else Status.FAILED


@dataclass(frozen=True, slots=True)
class Expired(Message):
    """Service→ranks: ``key`` timed out; ``missing`` lists the ranks never heard from.

    Wire: ``[1, "expired", "prefill", "req-7", [1], 30.0]``.
    """

    TAG: ClassVar[str] = "expired"

    group: str
    key: str
    missing: tuple[int, ...]
    waited_s: float = 0.0

    def __post_init__(self) -> None:
        f.name("Expired", "group", self.group)
        f.name("Expired", "key", self.key)
        store(self, "missing", f.uints("Expired", "missing", self.missing, limit=4096))
        store(self, "waited_s", f.number("Expired", "waited_s", self.waited_s))


#: The verdicts a rank can receive for a key.
Verdict = Release | Diverged | Expired
