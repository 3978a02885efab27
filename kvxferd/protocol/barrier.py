"""Messages between prefill daemons and the barrier service of their TP group.

Agreement is per *instance* of a key (a request id and the scheduler's
instance number, or the name of a blocking barrier such as ``ready``), never
per count. A request instance goes through two rounds:

1. **Admission.** The moment a rank holds the instance's cache_info it sends
   :class:`Admit` with the :class:`Terms` it holds. When every rank of the
   group admitted with equal terms the service answers :class:`Admitted`, and
   only then may a rank write a byte of the request.
2. **Completion.** A rank that wrote every layer sends :class:`Arrive` with a
   :class:`Digest` of what it wrote; every rank gets :class:`Release` when all
   arrived with equal digests.

In either round a rank may :class:`Withdraw` instead (refused, aborted, failed,
timed out). When every rank has spoken and they do not agree, every rank gets
:class:`Diverged`; when the round's deadline passes first, :class:`Expired`
naming the missing ranks. Every final verdict carries the status and reason
every rank reports, so one instance ends the same everywhere. Named barriers
(start-up) skip admission: their first word is an Arrive.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from kvxferd.protocol import fields as f
from kvxferd.protocol.base import ROLES, TRANSPORTS, Message, Status, Struct, store

#: Statuses a rank may withdraw with.
WITHDRAW_STATUSES = (Status.FAILED.value, Status.ABORTED.value)
#: Longest a rank may ask a key to stay open (one day); the service caps it at its own limit too.
MAX_TIMEOUT_S = 86400.0


def block_summary(blocks: Sequence[int]) -> str:
    """A short, exact-enough name of a block list: its length and a hash of the ids."""
    h = hashlib.blake2b(array("q", blocks).tobytes(), digest_size=8).hexdigest()
    return f"{len(blocks)} blocks #{h}"


def names_summary(names: Sequence[str]) -> str:
    """The same for a list of names (a cache_info's ``dst_generations``); "none" for none."""
    if not names:
        return "none"
    h = hashlib.blake2b("\0".join(names).encode(), digest_size=8).hexdigest()
    return f"{len(names)} names #{h}"


@dataclass(frozen=True, slots=True)
class Terms(Struct):
    """What one rank holds in a request's cache_info, as compared at admission.

    Every field must be equal on every rank of the group. Block lists travel as
    :func:`block_summary` strings, the decode registrations as a :func:`names_summary`.
    Wire: ``[200, 3, 17, "13 blocks #9f2c3b1a0e4d5c6b", "13 blocks #0e4d5c6b9f2c3b1a",
    "ipc:///run/kvxferd/decode-{rank}.sock", "auto", "2 names #5e1d0c9a7b3f2e40"]``.
    """

    num_tokens: int
    slot: int
    step: int
    src_blocks: str
    dst_blocks: str
    peer: str
    transport: str
    dst_generations: str = "none"  # names_summary of the cache_info's dst_generations

    #: fields in the order a divergence names them
    FIELDS: ClassVar[tuple[str, ...]] = (
        "num_tokens",
        "src_blocks",
        "dst_blocks",
        "dst_generations",
        "slot",
        "step",
        "peer",
        "transport",
    )

    def __post_init__(self) -> None:
        f.uint("Terms", "num_tokens", self.num_tokens, low=1)
        f.uint("Terms", "slot", self.slot)
        f.uint("Terms", "step", self.step)
        f.text("Terms", "src_blocks", self.src_blocks, limit=64, empty=False)
        f.text("Terms", "dst_blocks", self.dst_blocks, limit=64, empty=False)
        f.text("Terms", "peer", self.peer, limit=f.MAX_NAME, empty=False)
        f.choice("Terms", "transport", self.transport, TRANSPORTS)
        f.text("Terms", "dst_generations", self.dst_generations, limit=64, empty=False)

    def describe(self) -> str:
        regs = f", registrations {self.dst_generations}" if self.dst_generations != "none" else ""
        return (
            f"{self.num_tokens} tokens, slot {self.slot} of step {self.step}, src {self.src_blocks}, "
            f"dst {self.dst_blocks}{regs}, peer {self.peer}, transport {self.transport}"
        )


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
        f.text("Digest", "fingerprint", self.fingerprint, limit=f.MAX_NAME)  # (a Hello's ``serving`` fits)

    def describe(self) -> str:
        return f"{self.layers} layers, {self.blocks} blocks, {self.bytes} B, fp {self.fingerprint}"


@dataclass(frozen=True, slots=True)
class RankView(Struct):
    """One rank's word in a :class:`Diverged` verdict.

    ``status`` is ``ok`` for a rank that admitted (then ``terms`` is set) or
    arrived (then ``digest`` is set), ``failed`` or ``aborted`` for one that
    withdrew (then ``reason`` says why). Wire: ``[1, "aborted", null, null,
    "client cancelled"]`` or ``[0, "ok", [32, 13, ...], null, ""]``.
    """

    NESTED: ClassVar[dict[str, object]] = {"digest": Digest, "terms": Terms}

    rank: int
    status: Status
    digest: Digest | None = None
    terms: Terms | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        f.uint("RankView", "rank", self.rank)
        f.choice("RankView", "status", self.status, tuple(Status))
        store(self, "status", Status(self.status))
        said = [v for v in (self.digest, self.terms) if v is not None]
        if self.digest is not None and not isinstance(self.digest, Digest):
            raise f.fail("RankView", "digest", "expected a Digest")
        if self.terms is not None and not isinstance(self.terms, Terms):
            raise f.fail("RankView", "terms", "expected Terms")
        if self.status is Status.OK and len(said) != 1:
            raise f.fail("RankView", "digest", "a rank that admitted or arrived carries exactly one of terms, digest")
        if self.status is not Status.OK and said:
            raise f.fail("RankView", "digest", "a rank that withdrew carries no digest or terms")
        store(self, "reason", f.reason("RankView", "reason", self.reason))
        if self.status is not Status.OK and not self.reason:
            raise f.fail("RankView", "reason", "a rank that withdrew must say why")

    def describe(self) -> str:
        if self.digest is not None:
            return f"rank {self.rank}: {self.digest.describe()}"
        if self.terms is not None:
            return f"rank {self.rank}: {self.terms.describe()}"
        return f"rank {self.rank} {self.status}: {self.reason}"


def _key(owner: str, group: object, key: object, instance: object) -> None:
    """The checks every keyed message makes: group and key are names, instance an id."""
    f.name(owner, "group", group)
    f.name(owner, "key", key)
    f.uint(owner, "instance", instance)


def _ending(owner: str, msg: Diverged | Expired) -> None:
    _key(owner, msg.group, msg.key, msg.instance)
    f.choice(owner, "status", msg.status, tuple(Status))
    store(msg, "status", Status(msg.status))
    if msg.status is Status.OK:
        raise f.fail(owner, "status", "only a Release ends a key as ok")
    store(msg, "reason", f.reason(owner, "reason", msg.reason, empty=False))
    f.text(owner, "peer", msg.peer, limit=f.MAX_NAME)


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Rank→service: announce a rank of a group and the group's size. Answered with
    ``Ack("hello EPOCH")``, where EPOCH names the service's run (a new one after a restart).

    ``serving``: empty while the rank starts; once it serves, the fingerprint of its config,
    sent again every ``heartbeat_s`` (so the service knows the group runs, and with which
    config, and a rank that restarts can join it). Wire: ``[5, "hello", "prefill", 0, 2,
    "prefill", "9f2c..."]``.
    """

    TAG: ClassVar[str] = "hello"

    group: str
    rank: int
    world_size: int
    role: str
    serving: str = ""

    def __post_init__(self) -> None:
        f.name("Hello", "group", self.group)
        f.uint("Hello", "world_size", self.world_size, low=1, high=f.MAX_RANKS)
        f.uint("Hello", "rank", self.rank, high=self.world_size - 1)
        f.choice("Hello", "role", self.role, ROLES)
        f.text("Hello", "serving", self.serving, limit=f.MAX_NAME)


@dataclass(frozen=True, slots=True)
class Admit(Message):
    """Rank→service: this rank holds the cache_info of ``key`` (instance ``instance``), with these terms.

    Sent the moment the rank accepted the cache_info; it never waits for the
    answer. Wire: ``[5, "admit", "prefill", "req-7", 0, 1, [200, 3, 17, "13 blocks #9f2c...",
    "13 blocks #0e4d...", "ipc:///run/kvxferd/decode-{rank}.sock", "auto"]]``.
    """

    TAG: ClassVar[str] = "admit"
    NESTED: ClassVar[dict[str, object]] = {"terms": Terms}

    group: str
    key: str
    instance: int
    rank: int
    terms: Terms

    def __post_init__(self) -> None:
        _key("Admit", self.group, self.key, self.instance)
        f.uint("Admit", "rank", self.rank)
        if not isinstance(self.terms, Terms):
            raise f.fail("Admit", "terms", "expected Terms")


@dataclass(frozen=True, slots=True)
class Admitted(Message):
    """Service→ranks: every rank admitted ``key`` with equal terms; writing may begin.

    Not an ending: the completion round follows. Wire: ``[5, "admitted", "prefill", "req-7", 0]``.
    """

    TAG: ClassVar[str] = "admitted"

    group: str
    key: str
    instance: int

    def __post_init__(self) -> None:
        _key("Admitted", self.group, self.key, self.instance)


@dataclass(frozen=True, slots=True)
class Arrive(Message):
    """Rank→service: this rank finished its part of ``key``. Never blocks the rank.

    ``timeout_s`` (named barriers such as start-up) sets how long the key may
    stay open if this arrival opens it; 0 means the service's default.
    ``peer``: the decode peer the request's cache_info named (as in
    :class:`Withdraw`), so a round a restarted service reopens from arrivals
    still names whom to tell. Wire: ``[5, "arrive", "prefill", "req-7", 0, 1,
    [32, 13, 27262976, "9f2c..."], 0.0, "decode"]``.
    """

    TAG: ClassVar[str] = "arrive"
    NESTED: ClassVar[dict[str, object]] = {"digest": Digest}

    group: str
    key: str
    instance: int
    rank: int
    digest: Digest
    timeout_s: float = 0.0
    peer: str = ""

    def __post_init__(self) -> None:
        _key("Arrive", self.group, self.key, self.instance)
        f.text("Arrive", "peer", self.peer, limit=f.MAX_NAME)
        f.uint("Arrive", "rank", self.rank)
        if not isinstance(self.digest, Digest):
            raise f.fail("Arrive", "digest", "expected a Digest")
        store(self, "timeout_s", f.number("Arrive", "timeout_s", self.timeout_s, high=MAX_TIMEOUT_S))


@dataclass(frozen=True, slots=True)
class Withdraw(Message):
    """Rank→service: this rank will not complete ``key`` (refused, aborted, failed, timed out).

    It is the rank's word in whichever round is open, and replaces an Admit of
    the same round. Sent only once the rank has no write for the key in
    flight, so a verdict that follows means no rank is still writing.
    ``status`` is ``failed`` or ``aborted``. ``admitted``: the rank had heard
    ``Admitted``, so this is a word of the completion round (a service that
    restarted learns from it which round it lost). ``peer``: the decode peer its
    cache_info named ("" if it never held one), so a verdict of withdrawals only
    still names whom to tell. Wire: ``[5, "withdraw", "prefill", "req-7", 0, 1,
    "aborted", "client cancelled", true, "decode"]``.
    """

    TAG: ClassVar[str] = "withdraw"

    group: str
    key: str
    instance: int
    rank: int
    status: Status
    reason: str
    admitted: bool = False
    peer: str = ""

    def __post_init__(self) -> None:
        _key("Withdraw", self.group, self.key, self.instance)
        f.text("Withdraw", "peer", self.peer, limit=f.MAX_NAME)
        f.uint("Withdraw", "rank", self.rank)
        f.choice("Withdraw", "status", self.status, WITHDRAW_STATUSES)
        store(self, "status", Status(self.status))
        store(self, "reason", f.reason("Withdraw", "reason", self.reason, empty=False))
        f.flag("Withdraw", "admitted", self.admitted)


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Service→ranks: every rank arrived at ``key`` with the same digest: the request is ok.

    ``peer``: the decode endpoint template named at admission (as in :class:`Diverged`), so
    a rank that restarted after the release, and never held the request, can tell its decode
    rank that its predecessor's notice may be lost. ``absent``: only in a verdict the service
    relays to a decode rank (see :meth:`kvxferd.core.decode.DecodeCore.writer_gone`), the ranks
    of ``group`` that write into that decode rank and whose process ended; the decode rank takes
    the verdict as each one's failure notice. Wire: ``[5, "release", "prefill", "req-7", 0, [32,
    13, 27262976, "9f2c..."], "ipc:///run/kvx/decode-{rank}-peer.sock", []]``.
    """

    TAG: ClassVar[str] = "release"
    NESTED: ClassVar[dict[str, object]] = {"digest": Digest}

    group: str
    key: str
    instance: int
    digest: Digest
    peer: str = ""
    absent: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _key("Release", self.group, self.key, self.instance)
        if not isinstance(self.digest, Digest):
            raise f.fail("Release", "digest", "expected a Digest")
        f.text("Release", "peer", self.peer, limit=f.MAX_NAME)
        store(self, "absent", f.uints("Release", "absent", self.absent, limit=4096))

    @property
    def status(self) -> Status:
        return Status.OK

    @property
    def reason(self) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class Diverged(Message):
    """Service→ranks: every rank spoke about ``key`` but not in agreement; the instance ends.

    ``status`` and ``reason`` are what every rank reports; ``views`` holds each
    rank's terms, digest or withdrawal; ``peer`` the decode endpoint template
    from the admissions, so a rank that never held the cache_info can still
    tell its decode rank; ``absent`` as in :class:`Release`. Wire: ``[5, "diverged", "prefill",
    "req-7", 0, "aborted", "aborted: client cancelled", [[0, "ok", [...], null, ""], [1,
    "aborted", null, null, "client cancelled"]], "ipc:///run/kvxferd/decode-{rank}.sock", []]``.
    """

    TAG: ClassVar[str] = "diverged"
    NESTED: ClassVar[dict[str, object]] = {"views": [RankView]}
    LIMITS: ClassVar[dict[str, int]] = {"views": 4096}

    group: str
    key: str
    instance: int
    status: Status
    reason: str
    views: tuple[RankView, ...] = ()
    peer: str = ""
    absent: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _ending("Diverged", self)
        store(self, "views", f.items_of("Diverged", "views", self.views, RankView, limit=4096))
        store(self, "absent", f.uints("Diverged", "absent", self.absent, limit=4096))

    def describe(self) -> str:
        return "; ".join(v.describe() for v in self.views)


@dataclass(frozen=True, slots=True)
class Expired(Message):
    """Service→ranks: ``key``'s open round timed out; ``missing`` lists the ranks never heard from.

    ``status``, ``reason``, ``peer`` and ``absent`` as in :class:`Diverged`. Wire:
    ``[5, "expired", "prefill", "req-7", 0, [1], 30.0, "failed",
    "ranks [1] of group prefill did not report within 30s", "", []]``.
    """

    TAG: ClassVar[str] = "expired"

    group: str
    key: str
    instance: int
    missing: tuple[int, ...]
    waited_s: float
    status: Status
    reason: str
    peer: str = ""
    absent: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _ending("Expired", self)
        store(self, "missing", f.uints("Expired", "missing", self.missing, limit=4096))
        store(self, "absent", f.uints("Expired", "absent", self.absent, limit=4096))
        store(self, "waited_s", f.number("Expired", "waited_s", self.waited_s))


#: The verdicts that end a key.
Verdict = Release | Diverged | Expired
