"""Messages between engines and daemons, and between prefill and decode daemons.

Wire examples show the msgpack array written as JSON-ish text: ``[5, "abort",
"req-7", "client cancelled"]`` is version 1, tag ``abort``, then the fields.

Direction legend: W = prefill model worker, S = prefill scheduler, D = decode
engine, P = prefill daemon, Q = decode daemon.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

from kvxferd.protocol import fields as f
from kvxferd.protocol.base import MEMORY_KINDS, TRANSPORTS, ErrorCode, Key, Message, Status, Struct, request_id, store


@dataclass(frozen=True, slots=True)
class SlotChunk(Struct):
    """One batch slot of a forward step: which tokens of its request this step computes.

    ``token_offset`` is where this chunk starts in the request's prompt; an
    unchunked request has one chunk covering all its tokens. ``start_step`` is
    the step that computed the first chunk of the request now in this slot (so
    it equals the signal's step for a first chunk). ``(slot, start_step)``
    names one occupancy of a slot: a later chunk can never be taken for a
    chunk of the slot's previous or next request, whatever its offset.
    Wire: ``[3, 0, 128, 17]`` (slot 3, tokens 0..127, request began in step 17).
    """

    slot: int
    token_offset: int
    token_count: int
    start_step: int

    def __post_init__(self) -> None:
        f.uint("SlotChunk", "slot", self.slot)
        f.uint("SlotChunk", "token_offset", self.token_offset)
        f.uint("SlotChunk", "token_count", self.token_count, low=1)
        f.uint("SlotChunk", "start_step", self.start_step)


@dataclass(frozen=True, slots=True)
class LayerSignal(Message):
    """W→P: layer ``layer`` of forward step ``step`` is written to the KV cache.

    The layer-0 signal of a step carries the step's slot table: the slots whose
    KV this step writes. Signals of later layers carry no table; they apply to
    the slots named at layer 0 of the same step. Step ids increase and are never
    reused, which is how a stale signal is told apart from a slot's new occupant.

    Wire: ``[5, "layer", 17, 0, [[3, 0, 128, 17], [5, 512, 64, 15]]]`` (slot 3
    starts a request; slot 5 computes the second chunk of one begun in step 15),
    then ``[5, "layer", 17, 1, []]`` ...
    """

    TAG: ClassVar[str] = "layer"
    NESTED: ClassVar[dict[str, object]] = {"slots": [SlotChunk]}
    LIMITS: ClassVar[dict[str, int]] = {"slots": f.MAX_SLOTS}

    step: int
    layer: int
    slots: tuple[SlotChunk, ...] = ()

    @classmethod
    def checked(cls, step: int, layer: int) -> LayerSignal:
        """A signal with no slot table whose step and layer the caller has checked already
        against the bounds of ``__post_init__`` (the codec's own parse of the commonest frame):
        built without checking them again."""
        sig = object.__new__(cls)
        store(sig, "step", step)
        store(sig, "layer", layer)
        store(sig, "slots", ())
        return sig

    def __post_init__(self) -> None:
        f.uint("LayerSignal", "step", self.step)
        f.uint("LayerSignal", "layer", self.layer, high=1 << 16)
        slots = f.items_of("LayerSignal", "slots", self.slots, SlotChunk, limit=f.MAX_SLOTS)
        if self.layer > 0 and slots:
            raise f.fail("LayerSignal", "slots", f"only layer 0 carries a slot table (layer {self.layer})")
        seen = {c.slot for c in slots}
        if len(seen) != len(slots):
            raise f.fail("LayerSignal", "slots", "a slot appears twice in one step")
        for i, c in enumerate(slots):
            if c.start_step > self.step:
                raise f.fail("LayerSignal", f"slots[{i}].start_step", f"{c.start_step} is after step {self.step}")
        store(self, "slots", slots)


@dataclass(frozen=True, slots=True)
class CacheInfo(Message):
    """S→P (every rank of the prefill group): where request ``request_id``'s KV goes.

    ``step`` is the forward step that computes the request's first chunk in
    ``slot``; later chunks name it as their ``start_step``. ``src_blocks[i]``
    is copied to ``dst_blocks[i]`` on the decode instance reached at ``peer``
    (an endpoint template; ``{rank}`` is replaced by the sending rank).
    ``num_tokens`` is the prompt length; it must need exactly
    ``len(src_blocks)`` blocks. ``instance`` is the scheduler's name for this
    attempt at the request (an attempt number or a nonce): ``(request_id,
    instance)`` names one request instance everywhere, so an id may be reused
    with a new instance at any time, and a late message of the old instance
    is never taken for the new one.

    ``dst_generations[d]`` names the registration of decode rank ``d``'s cache
    that ``dst_blocks`` were reserved in (the ``generation`` of that rank's
    registration :class:`Ack`, :attr:`kvxferd.client.DecodeEngine.generations`).
    A prefill rank writes only into that registration: once the decode engine
    registered a new cache there, the request fails, since the same block ids
    in the new cache may belong to other requests. Empty: whatever registration
    the decode rank holds when the bytes are written (only safe for an engine
    that never registers again while requests are in flight).

    Wire: ``[5, "cache_info", "req-7", 3, 17, 200, [10, 11], [40, 41],
    "ipc:///run/kvxferd/decode-{rank}.sock", "auto", 0, ["5d0c9e2a71b4", "a1c3f09b2e77"]]``
    """

    TAG: ClassVar[str] = "cache_info"

    request_id: str
    slot: int
    step: int
    num_tokens: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    peer: str
    transport: str = "auto"
    instance: int = 0
    dst_generations: tuple[str, ...] = ()

    @property
    def key(self) -> Key:
        return (self.request_id, self.instance)

    def __post_init__(self) -> None:
        request_id("CacheInfo", self.request_id)
        f.uint("CacheInfo", "instance", self.instance)
        f.uint("CacheInfo", "slot", self.slot)
        f.uint("CacheInfo", "step", self.step)
        f.uint("CacheInfo", "num_tokens", self.num_tokens, low=1)
        src = f.uints("CacheInfo", "src_blocks", self.src_blocks, high=f.MAX_BLOCK_ID)
        dst = f.uints("CacheInfo", "dst_blocks", self.dst_blocks, high=f.MAX_BLOCK_ID)
        if not src:
            raise f.fail("CacheInfo", "src_blocks", "must name at least one block")
        if len(src) != len(dst):
            raise f.fail("CacheInfo", "dst_blocks", f"{len(dst)} destination blocks for {len(src)} source blocks")
        if len(set(dst)) != len(dst):
            raise f.fail("CacheInfo", "dst_blocks", "a destination block appears twice")
        f.text("CacheInfo", "peer", self.peer, limit=f.MAX_NAME, empty=False)
        f.choice("CacheInfo", "transport", self.transport, TRANSPORTS)
        gens = f.sequence("CacheInfo", "dst_generations", self.dst_generations, limit=f.MAX_RANKS)
        for i, gen in enumerate(gens):
            f.name("CacheInfo", f"dst_generations[{i}]", gen)
        store(self, "src_blocks", src)
        store(self, "dst_blocks", dst)
        store(self, "dst_generations", gens)


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """S→P: stop transferring instance ``instance`` of ``request_id``; it ends ``aborted``.

    An Abort that reaches a rank before the instance's cache_info is kept (for
    ``timeouts.pending_s``), and the cache_info then ends as aborted at once.
    Wire: ``[5, "abort", "req-7", "client cancelled", 0]``
    """

    TAG: ClassVar[str] = "abort"

    request_id: str
    reason: str = ""
    instance: int = 0

    @property
    def key(self) -> Key:
        return (self.request_id, self.instance)

    def __post_init__(self) -> None:
        request_id("Abort", self.request_id)
        store(self, "reason", f.reason("Abort", "reason", self.reason))
        f.uint("Abort", "instance", self.instance)


@dataclass(frozen=True, slots=True)
class TransferResult(Message):
    """P→S, and P→Q→D on failure: how a request instance ended on one prefill rank.

    ``status`` is ``ok`` only once every rank of the group confirmed its writes
    with agreeing digests; otherwise status and reason are the barrier's
    verdict, the same on every rank. A rank that *refused* the cache_info
    (``code`` names why: ``table_full``, ``bad_layout``...) reports at once with
    its own reason; the status is ``failed`` then, and so it is everywhere.
    ``bytes`` counts what this rank wrote. Timings in milliseconds: ``wait_ms``
    from cache_info to the job's recovery, ``send_ms`` from recovery to the last
    confirmed write, ``total_ms`` from cache_info to the end, ``admit_ms`` from
    cache_info to the admission verdict.

    Wire: ``[5, "result", "req-7", "ok", "", 0, 1048576, "shm", 0.4, 2.1, 2.9, 0, "", 0.2]``
    """

    TAG: ClassVar[str] = "result"

    request_id: str
    status: Status
    reason: str = ""
    rank: int = 0
    bytes: int = 0
    transport: str = ""
    wait_ms: float = 0.0
    send_ms: float = 0.0
    total_ms: float = 0.0
    instance: int = 0
    code: str = ""
    admit_ms: float = 0.0

    @property
    def key(self) -> Key:
        return (self.request_id, self.instance)

    def __post_init__(self) -> None:
        f.name("TransferResult", "request_id", self.request_id)
        f.choice("TransferResult", "status", self.status, tuple(Status))
        store(self, "status", Status(self.status))
        store(self, "reason", f.reason("TransferResult", "reason", self.reason))
        if self.status is not Status.OK and not self.reason:
            raise f.fail("TransferResult", "reason", f"a {self.status} result must say why")
        f.uint("TransferResult", "rank", self.rank)
        f.uint("TransferResult", "bytes", self.bytes)
        f.text("TransferResult", "transport", self.transport, limit=32)
        for name in ("wait_ms", "send_ms", "total_ms", "admit_ms"):
            store(self, name, f.number("TransferResult", name, getattr(self, name)))
        f.uint("TransferResult", "instance", self.instance)
        if self.code:
            f.choice("TransferResult", "code", self.code, tuple(ErrorCode))
            if self.status is Status.OK:
                raise f.fail("TransferResult", "code", "an ok result carries no code")


@dataclass(frozen=True, slots=True)
class KVReady(Message):
    """P→Q→D: every prefill rank's KV for ``request_id`` is in the decode cache.

    Sent only after the prefill group's barrier released the request. Wire:
    ``[5, "kv_ready", "req-7", 0, 1048576, 0, "5d0c9e2a71b4"]`` (instance 0,
    reported by prefill rank 0, which wrote 1 MiB into the decode cache
    registration named by ``generation``; see :class:`PeerInfo`).
    """

    TAG: ClassVar[str] = "kv_ready"

    request_id: str
    rank: int = 0
    bytes: int = 0
    instance: int = 0
    generation: str = ""

    @property
    def key(self) -> Key:
        return (self.request_id, self.instance)

    def __post_init__(self) -> None:
        f.name("KVReady", "request_id", self.request_id)
        f.uint("KVReady", "instance", self.instance)
        f.uint("KVReady", "rank", self.rank)
        f.uint("KVReady", "bytes", self.bytes)
        f.text("KVReady", "generation", self.generation, limit=f.MAX_NAME)


@dataclass(frozen=True, slots=True)
class Received(Message):
    """Q→P: the notice (KVReady or failed TransferResult) rank ``rank`` sent for this instance
    reached the decode engine, or its repeat was recognised. A prefill daemon keeps each notice
    until this comes and sends it again when the decode daemon's connection comes back (a daemon
    that died with notices unread loses none). ``status``, ``reason`` and ``code``: how the
    engine was told (a KVReady naming a registration the engine no longer holds is told as
    ``failed``, code ``not_registered``); a prefill rank reports ``ok`` to its scheduler only once
    it is told ``ok`` here. Wire: ``[5, "received", "req-7", 0, 4, "ok", "", ""]``.
    """

    TAG: ClassVar[str] = "received"

    request_id: str
    rank: int = 0
    instance: int = 0
    status: Status = Status.OK
    reason: str = ""
    code: str = ""

    @property
    def key(self) -> Key:
        return (self.request_id, self.instance)

    def __post_init__(self) -> None:
        f.name("Received", "request_id", self.request_id)
        f.uint("Received", "rank", self.rank)
        f.uint("Received", "instance", self.instance)
        f.choice("Received", "status", self.status, tuple(Status))
        store(self, "status", Status(self.status))
        store(self, "reason", f.reason("Received", "reason", self.reason))
        if self.status is not Status.OK and not self.reason:
            raise f.fail("Received", "reason", f"a {self.status} notice must say why")
        if self.code:
            f.choice("Received", "code", self.code, tuple(ErrorCode))
            if self.status is Status.OK:
                raise f.fail("Received", "code", "an ok notice carries no code")


#: What is outermost inside a block: the heads (HND) or the tokens (NHD).
BLOCK_ORDERS = ("heads", "tokens")


@dataclass(frozen=True, slots=True)
class CacheLayout(Struct):
    """Shape of one rank's KV cache, as the transports see it.

    With ``planes`` = 2 (split, the default) every layer has a K and a V
    region of ``num_blocks`` blocks of ``block_bytes`` bytes each (one block of
    one of K or V, this rank's heads). With ``planes`` = 1 (packed) every layer
    has one region (``kv`` = 0) whose blocks hold K and V together, in whatever
    order the engine's kernels keep them (vLLM's CPU backend does so): a block
    is then ``block_bytes`` of K and V. ``order`` says what is outermost inside
    a block: ``heads`` (``[heads, tokens, ...]``, vLLM's HND) or ``tokens``
    (``[tokens, heads, ...]``, NHD). Whole blocks move alike either way; it
    matters where a rank writes a slice of each block's heads (groups of
    different sizes). ``block_stride``: bytes from one block's start to the
    next, where the engine pads its blocks (0: ``block_bytes``, packed blocks);
    it describes one side's memory only, so two sides may differ in it. Wire:
    ``[32, 1024, 65536]`` (split), ``[32, 1024, 131072, 1]`` (packed), ``[32,
    1024, 65536, 2, "tokens", 69632]``.
    """

    num_layers: int
    num_blocks: int
    block_bytes: int
    planes: int = 2
    order: str = "heads"
    block_stride: int = 0

    def __post_init__(self) -> None:
        f.uint("CacheLayout", "num_layers", self.num_layers, low=1, high=1 << 16)
        f.uint("CacheLayout", "num_blocks", self.num_blocks, low=1, high=1 << 31)
        f.uint("CacheLayout", "block_bytes", self.block_bytes, low=1, high=1 << 40)
        f.uint("CacheLayout", "planes", self.planes, low=1, high=2)
        f.choice("CacheLayout", "order", self.order, BLOCK_ORDERS)
        f.uint("CacheLayout", "block_stride", self.block_stride, high=1 << 41)
        if self.block_stride and self.block_stride < self.block_bytes:
            raise f.fail(
                "CacheLayout", "block_stride", f"{self.block_stride} is less than block_bytes {self.block_bytes}"
            )

    @property
    def stride(self) -> int:
        """Bytes from one block's start to the next."""
        return self.block_stride or self.block_bytes

    @property
    def region_bytes(self) -> int:
        """Bytes of one region, from block 0's start to the last block's end."""
        return (self.num_blocks - 1) * self.stride + self.block_bytes

    def unpadded(self) -> CacheLayout:
        """The same layout without its block stride: what two sides' layouts must agree on."""
        return CacheLayout(self.num_layers, self.num_blocks, self.block_bytes, self.planes, self.order)


@dataclass(frozen=True, slots=True)
class Region(Struct):
    """Where one layer's K (``kv`` = 0) or V (``kv`` = 1) blocks live.

    ``handle`` is transport-specific: a POSIX shared-memory name for host
    memory, a CUDA IPC memory handle (bytes) for GPU memory. ``offset`` is the
    byte offset of block 0 inside what the handle maps; ``device`` the GPU
    ordinal (0 for host memory). Wire: ``[0, 1, "kvx-d0-cache", 4194304, 0]``.
    """

    layer: int
    kv: int
    handle: str | bytes
    offset: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        f.uint("Region", "layer", self.layer, high=1 << 16)
        f.uint("Region", "kv", self.kv, high=1)
        if isinstance(self.handle, str):
            f.name("Region", "handle", self.handle)
        else:
            f.blob("Region", "handle", self.handle, limit=1024)
        f.uint("Region", "offset", self.offset, high=f.MAX_OFFSET)
        f.uint("Region", "device", self.device, high=1024)


def _check_regions(owner: str, layout: CacheLayout, regions: object) -> tuple[Region, ...]:
    items = f.items_of(owner, "regions", regions, Region)
    want = {(layer, kv) for layer in range(layout.num_layers) for kv in range(layout.planes)}
    have = [(r.layer, r.kv) for r in items]
    if len(set(have)) != len(have) or set(have) != want:
        need = "one K and one V region" if layout.planes == 2 else "one region (kv 0: K and V packed)"
        raise f.fail(owner, "regions", f"need exactly {need} for each of {layout.num_layers} layers")
    # Regions that share a handle must not overlap: a write into one would land in another
    # (and some transports refuse to register overlapping memory at all).
    by_handle: dict[tuple[str | bytes, int], list[Region]] = {}
    for r in items:
        by_handle.setdefault((r.handle, r.device), []).append(r)
    size = layout.region_bytes
    for shared in by_handle.values():
        shared.sort(key=lambda r: r.offset)
        for a, b in itertools.pairwise(shared):
            if a.offset + size > b.offset:
                raise f.fail(
                    owner,
                    "regions",
                    f"the regions of layer {a.layer} {'KV'[a.kv]} and layer {b.layer} {'KV'[b.kv]} overlap "
                    f"(offsets {a.offset} and {b.offset}, {size} bytes each)",
                )
    return tuple(sorted(items, key=lambda r: (r.layer, r.kv)))


@dataclass(frozen=True, slots=True)
class RegisterCache(Message):
    """W/D→daemon: the engine's KV memory for this rank. The daemon never allocates it.

    Wire: ``[5, "register", "host", [2, 64, 4096], [[0, 0, "kvx-p0", 0, 0],
    [0, 1, "kvx-p0", 262144, 0], ...]]``. Answered with :class:`Ack`.
    """

    TAG: ClassVar[str] = "register"
    NESTED: ClassVar[dict[str, object]] = {"layout": CacheLayout, "regions": [Region]}

    memory: str
    layout: CacheLayout
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        f.choice("RegisterCache", "memory", self.memory, MEMORY_KINDS)
        if not isinstance(self.layout, CacheLayout):
            raise f.fail("RegisterCache", "layout", "expected a CacheLayout")
        store(self, "regions", _check_regions("RegisterCache", self.layout, self.regions))


@dataclass(frozen=True, slots=True)
class PeerQuery(Message):
    """P→Q: ask a decode daemon for its :class:`PeerInfo`. Wire: ``[5, "peer_query", "prefill", 0]``."""

    TAG: ClassVar[str] = "peer_query"

    group: str
    rank: int

    def __post_init__(self) -> None:
        f.name("PeerQuery", "group", self.group)
        f.uint("PeerQuery", "rank", self.rank)


@dataclass(frozen=True, slots=True)
class PeerInfo(Message):
    """Q→P: what a prefill daemon needs to write into this decode rank's cache.

    ``host_id`` identifies the machine (same host enables shm and cuda_ipc).
    ``transports`` carries opaque per-transport metadata (e.g. an RDMA agent's
    connection blob). ``generation`` names the engine's registration: the same
    for the same engine registering the same cache (again, say with a restarted
    daemon: the blocks it reserved stay valid), a new one for a new cache or a
    new engine process, so bytes written into one registration are never
    reported as ready for another (:class:`KVReady` names the generation it
    wrote into, a :class:`CacheInfo` the ones its blocks were reserved in).
    Wire: ``[5, "peer_info", "decode", 0, "host-a1b2", "host", [2, 64, 4096],
    [[0, 0, "kvx-d0", 0, 0], ...], {"rdma": b"..."}, "5d0c9e2a71b4"]``.
    """

    TAG: ClassVar[str] = "peer_info"
    NESTED: ClassVar[dict[str, object]] = {"layout": CacheLayout, "regions": [Region]}

    group: str
    rank: int
    host_id: str
    memory: str
    layout: CacheLayout
    regions: tuple[Region, ...]
    transports: dict[str, bytes]
    generation: str = ""

    def __post_init__(self) -> None:
        f.name("PeerInfo", "group", self.group)
        f.uint("PeerInfo", "rank", self.rank)
        f.name("PeerInfo", "host_id", self.host_id)
        f.choice("PeerInfo", "memory", self.memory, MEMORY_KINDS)
        if not isinstance(self.layout, CacheLayout):
            raise f.fail("PeerInfo", "layout", "expected a CacheLayout")
        store(self, "regions", _check_regions("PeerInfo", self.layout, self.regions))
        store(self, "transports", f.blob_map("PeerInfo", "transports", self.transports))
        f.text("PeerInfo", "generation", self.generation, limit=f.MAX_NAME)


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Daemon→client: the message named by ``ref`` was accepted. A decode daemon's Ack of a cache
    registration names it (``generation``, what a :class:`CacheInfo`'s ``dst_generations`` carry).
    Wire: ``[5, "ack", "register", "5d0c9e2a71b4"]``."""

    TAG: ClassVar[str] = "ack"

    ref: str = ""
    generation: str = ""

    def __post_init__(self) -> None:
        f.text("Ack", "ref", self.ref, limit=f.MAX_NAME)
        f.text("Ack", "generation", self.generation, limit=f.MAX_NAME)


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Any→sender: the sender's message was refused. ``ref`` names what it was about.

    Wire: ``[5, "error", "out_of_range", "src block 9000 >= 4096 blocks", "req-7"]``
    """

    TAG: ClassVar[str] = "error"

    code: ErrorCode
    detail: str
    ref: str = ""

    def __post_init__(self) -> None:
        f.choice("Error", "code", self.code, tuple(ErrorCode))
        store(self, "code", ErrorCode(self.code))
        store(self, "detail", f.reason("Error", "detail", self.detail or "(no detail)"))
        store(self, "ref", f.clip(f.reason("Error", "ref", self.ref), f.MAX_NAME))


#: What an engine connection may say it is (:class:`Attach`).
ATTACH_ROLES = ("scheduler",)


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """S→P: this connection is a prefill scheduler: besides cache_infos, it may abort a request
    whose cache_info has not reached the rank yet. Answered with :class:`Ack`.

    Wire: ``[5, "attach", "scheduler"]``.
    """

    TAG: ClassVar[str] = "attach"

    role: str

    def __post_init__(self) -> None:
        f.choice("Attach", "role", self.role, ATTACH_ROLES)


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    """Anyone→daemon: ask what the daemon is doing. Wire: ``[5, "status"]``."""

    TAG: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """Daemon→asker: its identity, state (``starting``, ``serving``, ``draining``) and a JSON report
    (table sizes, live requests with what each waits for, peers, counters).

    Wire: ``[5, "status_reply", "prefill", "prefill", 0, "serving", "{\\"requests\\": []}"]``.
    """

    TAG: ClassVar[str] = "status_reply"

    role: str
    group: str
    rank: int
    state: str
    report: str = "{}"

    def __post_init__(self) -> None:
        f.text("StatusReply", "role", self.role, limit=32)
        f.text("StatusReply", "group", self.group, limit=f.MAX_NAME)
        f.uint("StatusReply", "rank", self.rank)
        f.text("StatusReply", "state", self.state, limit=32)
        f.text("StatusReply", "report", self.report, limit=f.MAX_BLOB)


@dataclass(frozen=True, slots=True)
class BlockOffer(Message):
    """D→S, engine to engine (the vLLM connector's rendezvous): decode rank ``rank`` of group
    ``group`` reserved ``dst_blocks`` for transfer ``request_id``, a prompt of ``num_tokens``
    tokens, and those blocks may be written from now on, in the cache registration ``generation``
    names. The prefill scheduler puts the blocks into the transfer's CacheInfo once every decode
    rank offered the same ones, and each rank's generation into its ``dst_generations``.
    Wire: ``[5, "block_offer", "xfer-7", "decode", 0, 200, [40, 41], "5d0c9e2a71b4"]``.
    """

    TAG: ClassVar[str] = "block_offer"

    request_id: str
    group: str
    rank: int
    num_tokens: int
    dst_blocks: tuple[int, ...]
    generation: str = ""

    def __post_init__(self) -> None:
        f.name("BlockOffer", "request_id", self.request_id)
        f.text("BlockOffer", "group", self.group, limit=f.MAX_NAME, empty=False)
        f.uint("BlockOffer", "rank", self.rank, high=1 << 16)
        f.uint("BlockOffer", "num_tokens", self.num_tokens, low=1)
        dst = f.uints("BlockOffer", "dst_blocks", self.dst_blocks, high=f.MAX_BLOCK_ID)
        if not dst:
            raise f.fail("BlockOffer", "dst_blocks", "must name at least one block")
        if len(set(dst)) != len(dst):
            raise f.fail("BlockOffer", "dst_blocks", "a block appears twice")
        f.text("BlockOffer", "generation", self.generation, limit=f.MAX_NAME)
        store(self, "dst_blocks", dst)


@dataclass(frozen=True, slots=True)
class OfferDeclined(Message):
    """S→D, engine to engine: the prefill side will not write transfer ``request_id`` (it gave
    up waiting, failed the prompt, or found the offer wrong); the decode engine may reuse the
    blocks it offered at once. Wire: ``[5, "offer_declined", "xfer-7", "the prompt was aborted"]``.
    """

    TAG: ClassVar[str] = "offer_declined"

    request_id: str
    reason: str

    def __post_init__(self) -> None:
        f.name("OfferDeclined", "request_id", self.request_id)
        store(self, "reason", f.reason("OfferDeclined", "reason", self.reason))
