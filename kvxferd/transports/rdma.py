"""``rdma``: NIXL agents with the UCX backend, across nodes (UCX over TCP on loopback in CI).

Theory of operation
-------------------
*Decode side* (``publish``): an agent with NIXL's progress thread registers
the engine's cache (host memory: the shared-memory segments, mapped into this
daemon) and publishes, inside its PeerInfo, the agent's connection metadata
and the address of each layer's K and V region. NIXL's wrapper makes that
thread spin; we give it a wake-up bound (``rdma_wake_ms``) so an idle daemon
sleeps while UCX events still wake it at once.

*Prefill side*: an agent without a progress thread (the daemon loop drives
progress by polling) registers the local cache and prepares one descriptor
list over every block of every region, once. Opening a peer adds its agent
and prepares the same list over the peer's regions. A write of runs for one
layer is then one WRITE over block indices of both lists, K and V together;
NIXL merges consecutive indices, so a run costs one UCX operation. Writes
are polled to completion; errors (remote disconnect, not found, backend
error) and writes older than ``write_timeout_s`` fail with a reason.

A rank writing a slice of each block (the KV heads of a decode rank that holds fewer heads than
it does: 2 prefill ranks into 4) would be one UCX operation per block, its slices being apart in
its own cache though side by side in the peer's. Such a write is first gathered (numpy, in the
loop) into a staging buffer registered once (``rdma_staging_mb``), so each run is one operation
again. The staging bytes of a write are taken back when none of them can be read any more (the
same moment its failure may be reported, below). A write that finds too little free staging
waits, in order, until enough is back: it is in flight all the while, and completes, or fails
when ``write_timeout_s`` passes, as any other; closing its peer or
:meth:`RdmaTransport.cancel` fails it before a byte of it left. One larger than the whole
staging is sent block by block. A rank writing whole blocks into a slice of each of the peer's
blocks (4 prefill ranks into 2) is one operation per block: gathering cannot join those, only
scattering on the decode side could, which this version does not do.

A failed write is reported only once none of its bytes can land any more: its
handle was released (NIXL cancels what it has not done), or, if NIXL will not
release it, the peer's agent was removed, which tears its connections down
(every other write to that peer fails with it; the next write opens the peer
again). If neither works the write stays in flight, tried again at each poll,
and its request's ending waits (bounded by the request's own drain deadline).
What tearing down cannot take back: bytes already handed to the network (over
TCP, those in the kernel's socket buffers; on a NIC, those on the wire), which
the peer still applies as it reads them, moments later, or once it runs again
if it was stopped.

UCX reads its settings from the environment when the backend starts; they
come from the config (``rdma_tls``, ``rdma_interface``, ``rdma_log_level``),
and NIXL's own Python logs are routed to our stderr logging.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import msgpack
import numpy as np

from kvxferd.config import TransportConfig
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import CacheLayout, PeerInfo, RegisterCache, fields
from kvxferd.transports.base import Completion, RunTable, Transport
from kvxferd.transports.shm import MappedCache

log = logging.getLogger(__name__)

BLOB_VERSION = 1
_names = itertools.count()


def _load(config: TransportConfig) -> tuple[ModuleType, tuple[type[BaseException], ...]]:
    """Import NIXL with UCX configured from ``config``; the module and its error classes."""
    os.environ["UCX_TLS"] = config.rdma_tls
    os.environ["UCX_NET_DEVICES"] = config.rdma_interface
    os.environ.setdefault("UCX_MODULES", "^efa")  # otherwise processes can crash at exit next to rdma-core
    os.environ["NIXL_LOG_LEVEL"] = config.rdma_log_level
    os.environ.setdefault("UCX_LOG_LEVEL", config.rdma_log_level.lower())
    try:
        nixl_cu12 = importlib.import_module("nixl_cu12")
        _bindings = importlib.import_module("nixl_cu12._bindings")
    except ImportError as exc:
        raise TransportUnavailable(f"NIXL is not installed (pip install 'kvxferd[rdma]'): {exc}") from None
    nixl_log = logging.getLogger("nixl")  # NIXL logs to stdout with a handler of its own: use ours
    for handler in list(nixl_log.handlers):
        nixl_log.removeHandler(handler)
    nixl_log.propagate = True
    errors = tuple(
        cls
        for name in dir(_bindings)
        if name.startswith("nixl") and name.endswith("Error")
        if isinstance(cls := getattr(_bindings, name), type) and issubclass(cls, BaseException)
    )
    return nixl_cu12, errors


def _agent(nixl: ModuleType, name: str, config: TransportConfig, *, progress_thread: bool) -> Any:
    """A NIXL agent with the UCX backend on the configured interface.

    NIXL's wrapper hard-codes the progress thread's poll delay to 0 (it spins a
    core). While the agent is built we hand it a config type whose delay cannot
    be set to 0; if NIXL's internals ever change, we warn and accept the default.
    """
    cfg = nixl.nixl_agent_config(enable_prog_thread=progress_thread, enable_listen_thread=False, backends=[])
    api = nixl._api
    base: Any = getattr(getattr(api, "nixlBind", None), "nixlAgentConfig", None)
    wake_us = config.rdma_wake_ms * 1000
    if progress_thread and base is not None and hasattr(base, "pthrDelay"):

        class _Bounded(base):  # type: ignore[misc]
            @property
            def pthrDelay(self) -> int:
                return int(base.pthrDelay.__get__(self))

            @pthrDelay.setter
            def pthrDelay(self, _value: int) -> None:
                base.pthrDelay.__set__(self, wake_us)

        api.nixlBind.nixlAgentConfig = _Bounded
        try:
            agent = nixl.nixl_agent(name, cfg)
        finally:
            api.nixlBind.nixlAgentConfig = base
    else:
        if progress_thread:
            log.warning("cannot bound NIXL's progress thread: it will spin a core while idle")
        agent = nixl.nixl_agent(name, cfg)
    agent.create_backend("UCX", {"ucx_devices": config.rdma_interface})
    return agent


@dataclass(frozen=True)
class PeerBlob:
    """What a decode daemon publishes for ``rdma``: agent name and metadata, and where each region lives."""

    agent: str
    metadata: bytes
    mem: str  # DRAM | VRAM
    regions: tuple[tuple[int, int, int, int], ...]  # (layer, kv, address, device)

    def pack(self) -> bytes:
        data: bytes = msgpack.packb([BLOB_VERSION, self.agent, self.metadata, self.mem, self.regions])
        return data

    @classmethod
    def unpack(cls, blob: bytes) -> PeerBlob:
        """The peer's blob, every field checked for type and range before use (a peer's bytes are
        untrusted: no value of them may overflow, exhaust memory or raise anything but TransportError)."""
        try:
            items = msgpack.unpackb(
                blob, raw=False, max_str_len=256, max_bin_len=len(blob), max_array_len=MAX_REGIONS, max_map_len=0
            )
            if not isinstance(items, list) or len(items) != 5:
                raise ValueError("expected [version, agent, metadata, memory, regions]")
            version, agent, metadata, mem, regions = items
            if version != BLOB_VERSION or mem not in ("DRAM", "VRAM"):
                raise ValueError(f"blob version {fields.show(version)}, memory {fields.show(mem)}")
            if (
                not isinstance(agent, str)
                or not agent
                or not isinstance(metadata, bytes)
                or not isinstance(regions, list)
            ):
                raise ValueError("agent must be a name, metadata bytes, regions a list")
            spans = tuple(_span(r) for r in regions)
            return cls(agent, metadata, mem, spans)
        except (ValueError, TypeError, OverflowError, MemoryError, RecursionError, msgpack.UnpackException) as exc:
            raise TransportError(f"peer's rdma metadata is malformed: {fields.clip(str(exc), 200)}") from None


#: Most regions a blob may list (two per layer).
MAX_REGIONS = 2 << 16


def _span(region: object) -> tuple[int, int, int, int]:
    """One (layer, kv, address, device), each an int in range."""
    if not isinstance(region, list) or len(region) != 4 or not all(type(v) is int for v in region):
        raise ValueError("a region is [layer, kv, address, device], all integers")
    layer, kv, address, device = region
    if not (0 <= layer <= 1 << 16 and kv in (0, 1) and 0 < address < 1 << 64 and 0 <= device <= 1024):
        raise ValueError(f"region {fields.show(region)} is out of range")
    return layer, kv, address, device


def _rows(
    layout: CacheLayout, address: dict[tuple[int, int], int], device: int, part: tuple[int, int] | None = None
) -> np.ndarray[Any, Any]:
    """A strided descriptor list: one row per (layer, kv) region, one descriptor per block
    (``part``: only bytes ``offset .. offset + length`` of each block, a slice of its heads).

    Block ``b`` of layer ``l``, region ``kv``, is descriptor ``(planes * l + kv) * num_blocks + b``.
    NIXL's strided rows are (address, length, device, stride, count).
    """
    offset, length = part if part is not None else (0, layout.block_bytes)
    rows = [
        (address[(layer, kv)] + offset, length, device, layout.stride, layout.num_blocks)
        for layer in range(layout.num_layers)
        for kv in range(layout.planes)
    ]
    return np.array(rows, dtype=np.uint64)


def _indices(layout: CacheLayout, layers: Sequence[int], runs: RunTable, side: int) -> np.ndarray[Any, Any]:
    """Descriptor indices of every block of ``runs`` (``side`` 0: sources, 1: destinations) in each
    of ``layers``, K then V (one region only when packed), layer after layer."""
    starts, lengths = runs[:, side], runs[:, 2]
    before = np.cumsum(lengths) - lengths  # blocks of the runs ahead of each run
    blocks = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))
    n = layout.num_blocks
    out: np.ndarray[Any, Any] = np.concatenate(
        [(layout.planes * layer + kv) * n + blocks for layer in layers for kv in range(layout.planes)]
    )
    return out


class _Staging:
    """Host memory, registered with NIXL, into which slices of blocks are gathered: byte ranges
    handed out first fit, each aligned to its slice length (so slot ``start // length`` of a list
    over the buffer in slots of that length), taken back by :meth:`give`."""

    def __init__(self, agent: Any, nbytes: int) -> None:
        self.agent = agent
        self.buf = np.zeros(nbytes, dtype=np.uint8)
        self.reg = agent.register_memory([(self.buf.ctypes.data, nbytes, 0, "")], "DRAM")
        self.free: list[tuple[int, int]] = [(0, nbytes)]  # (start, end), sorted, never adjacent
        self.lists: dict[int, Any] = {}  # slice length -> the buffer as slots of that length

    def slots(self, length: int) -> Any:
        """The buffer as a descriptor list of ``length``-byte slots (prepared once per length)."""
        prepped = self.lists.get(length)
        if prepped is None:
            row = (self.buf.ctypes.data, length, 0, length, len(self.buf) // length)
            prepped = self.lists[length] = self.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", np.array([row], dtype=np.uint64), "DRAM"
            )
        return prepped

    def take(self, nbytes: int, align: int) -> int | None:
        """The start of ``nbytes`` free bytes at a multiple of ``align``, now taken; None if no
        free range holds them."""
        for i, (start, end) in enumerate(self.free):
            at = -(-start // align) * align
            if at + nbytes <= end:
                pieces = [(a, b) for a, b in ((start, at), (at + nbytes, end)) if a < b]
                self.free[i : i + 1] = pieces
                return at
        return None

    def give(self, start: int, nbytes: int) -> None:
        """Bytes ``start .. start + nbytes`` are free again (merged with their free neighbours)."""
        end = start + nbytes
        i = 0
        while i < len(self.free) and self.free[i][1] < start:
            i += 1
        if i < len(self.free) and self.free[i][1] == start:
            start = self.free.pop(i)[0]
        if i < len(self.free) and self.free[i][0] == end:
            end = self.free.pop(i)[1]
        self.free.insert(i, (start, end))

    def close(self) -> None:
        for prepped in self.lists.values():
            with contextlib.suppress(Exception):
                prepped.release()
        self.lists.clear()
        self.agent.deregister_memory(self.reg)


@dataclass
class _Remote:
    name: str
    prepped: Any
    local: Any = None  # the local list of a peer written a slice of each block (None: the whole-block one)


class RdmaTransport(Transport):
    name = "rdma"
    slices = True  # a slice of each block is one descriptor per block, as a whole block is

    def __init__(self, config: TransportConfig, local: RegisterCache) -> None:
        super().__init__(config, local)
        if local.memory != "host":
            raise TransportUnavailable("rdma with GPU-resident caches is not wired up yet (host memory only)")
        self._nixl, self._errors = _load(config)
        self._agent: Any = None
        self._mapped: MappedCache | None = None
        self._reg: Any = None
        self._prepped: Any = None
        self._remotes: dict[str, _Remote] = {}
        self._infos: dict[str, PeerInfo] = {}  # what each open peer was opened with (to open it again)
        self._inflight: dict[int, tuple[Any, float, str]] = {}  # write id -> (handle, deadline, peer)
        #: failed writes NIXL would neither release nor cut off: write id -> (handle, peer, error)
        self._stuck: dict[int, tuple[Any, str, str]] = {}
        self._done: list[Completion] = []
        self._staging: _Staging | None = None  # made at the first write that gathers slices
        self._staged: dict[int, tuple[int, int]] = {}  # write id -> (start, bytes) of its staging
        #: writes waiting for staging, in order: write id -> (peer, layers, runs, deadline)
        self._waiting: dict[int, tuple[str, Sequence[int], RunTable, float]] = {}

    # -- local memory ----------------------------------------------------------------------

    def _register(self, *, progress_thread: bool) -> None:
        if self._agent is not None:
            return
        name = f"kvx-{os.getpid()}-{next(_names)}"
        try:
            self._agent = _agent(self._nixl, name, self.config, progress_thread=progress_thread)
            self._mapped = MappedCache(self.local, writable=True, who="the local engine")
            layout = self.local.layout
            spans = [(view.ctypes.data, layout.region_bytes, 0, "") for view in self._mapped.views.values()]
            self._reg = self._agent.register_memory(spans, "DRAM")
            if not progress_thread:
                self._prepped = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._local_rows(), "DRAM")
        except self._errors as exc:
            self.close()
            raise TransportError(f"NIXL could not set up the local cache: {type(exc).__name__}: {exc}") from None

    def _local_rows(self) -> np.ndarray[Any, Any]:
        assert self._mapped is not None
        return _rows(self.local.layout, {k: v.ctypes.data for k, v in self._mapped.views.items()}, 0)

    def prepare(self) -> None:
        self._register(progress_thread=False)

    def publish(self) -> bytes:
        self._register(progress_thread=True)
        assert self._mapped is not None
        regions = tuple((layer, kv, view.ctypes.data, 0) for (layer, kv), view in self._mapped.views.items())
        return PeerBlob(self._agent.name, self._agent.get_agent_metadata(), "DRAM", regions).pack()

    # -- peers and writes --------------------------------------------------------------------

    def _open_peer(self, key: str, peer: PeerInfo) -> None:
        blob = peer.transports.get(self.name)
        if blob is None:
            raise TransportError(f"peer {key} offers no rdma (is NIXL installed where it runs?)")
        info = PeerBlob.unpack(blob)
        if info.mem != "DRAM" or peer.memory != "host":
            raise TransportError(f"peer {key} keeps its cache in {info.mem}; rdma here writes host memory only")
        cut = self._cuts.get(key)
        if cut is not None and cut.count > 1:
            raise TransportError(
                f"peer {key}: the heads this rank writes are {cut.count} separate pieces of every block (a "
                "token-major cache); rdma would need a descriptor per token, or a staging copy, neither of "
                "which this version does: use a heads-major cache, or shm"
            )
        self.prepare()
        address = {(layer, kv): addr for layer, kv, addr, _ in info.regions}
        want = {(layer, kv) for layer in range(peer.layout.num_layers) for kv in range(peer.layout.planes)}
        if set(address) != want:
            raise TransportError(f"peer {key}'s rdma metadata does not cover every region of every layer")
        try:
            try:
                name = self._agent.add_remote_agent(info.metadata)
            except self._errors:  # a restarted peer under the same name: forget the old one first
                self._agent.remove_remote_agent(info.agent)
                name = self._agent.add_remote_agent(info.metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)
            there = None if cut is None else (cut.dst, cut.length)
            prepped = self._agent.prep_xfer_dlist(name, _rows(peer.layout, address, 0, there), "DRAM")
            local = None
            if cut is not None:
                assert self._mapped is not None
                mine = {k: v.ctypes.data for k, v in self._mapped.views.items()}
                rows = _rows(self.local.layout, mine, 0, (cut.src, cut.length))
                local = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows, "DRAM")
        except self._errors as exc:
            raise TransportError(f"NIXL could not open peer {key}: {type(exc).__name__}: {exc}") from None
        self._remotes[key] = _Remote(name, prepped, local)
        self._infos[key] = peer

    def _post(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable) -> Completion | None:
        deadline = time.monotonic() + self.config.write_timeout_s
        if (self._waiting and self._stages(key)) or not self._start(write_id, key, layers, runs, deadline):
            self._waiting[write_id] = (key, layers, runs, deadline)  # (behind those already waiting)
            return None
        if write_id not in self._inflight:  # NIXL refused it: its completion waits in _done
            return self._done.pop()
        return self._check(write_id, starting=True)

    def _start(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable, deadline: float) -> bool:
        """Hand write ``write_id`` to NIXL (in flight from then on, or failed at once: in
        ``_done``); False if it waits for staging."""
        if key not in self._remotes:  # its agent was removed to stop a failed write: add it again
            self._open_peer(key, self._infos[key])
        remote = self._remotes[key]
        layout, peer = self.local.layout, self._peers[key]
        src_list, src_idx = self._prepped if remote.local is None else remote.local, None
        cut = self._cuts.get(key)
        if cut is not None and self._stages(key):
            staged = self._gather(write_id, layers, runs, cut.src, cut.length)
            if staged is False:
                return False
            if isinstance(staged, tuple):
                src_list, src_idx = staged
        try:
            handle = self._agent.make_prepped_xfer(
                "WRITE",
                src_list,
                _indices(layout, layers, runs, 0) if src_idx is None else src_idx,
                remote.prepped,
                _indices(peer, layers, runs, 1),
                b"",
            )
        except self._errors as exc:
            self._unstage(write_id)
            error = f"NIXL refused the write to {key}: {type(exc).__name__}: {exc}"
            self._done.append(self.completion(write_id, key, error))
            return True
        self._inflight[write_id] = (handle, deadline, key)
        return True

    def _stages(self, key: str) -> bool:
        """Whether writes to peer ``key`` are gathered through staging: a slice of each block that
        fills the peer's blocks (the peer's side is then contiguous, ours is not). Only those may
        wait for staging; a write to any other peer never waits behind them."""
        cut = self._cuts.get(key)
        return (
            cut is not None
            and cut.count == 1
            and cut.length == self._peers[key].stride
            and self.config.rdma_staging_mb > 0
        )

    def _start_waiting(self) -> list[Completion]:
        """Start the writes waiting for staging, in order, while it has room; fail those whose
        time ran out (none of their bytes left). What finished at once is returned."""
        done: list[Completion] = []
        now = time.monotonic()
        for wid, (key, layers, runs, deadline) in list(self._waiting.items()):
            if now > deadline:
                del self._waiting[wid]
                waited = self.config.write_timeout_s
                done.append(self.completion(wid, key, f"write to {key} found no free staging in {waited:g}s"))
                continue
            try:
                started = self._start(wid, key, layers, runs, deadline)
            except TransportError as exc:
                del self._waiting[wid]
                done.append(self.completion(wid, key, str(exc)))
                continue
            if not started:
                break  # (in order: a later one does not pass it)
            del self._waiting[wid]
            if wid in self._inflight and (c := self._check(wid, starting=True)) is not None:
                done.append(c)
        return done

    def _gather(
        self, write_id: int, layers: Sequence[int], runs: RunTable, offset: int, length: int
    ) -> tuple[Any, np.ndarray[Any, Any]] | bool | None:
        """Copy bytes ``offset .. offset + length`` of every block of ``runs`` in ``layers`` (K then
        V, layer after layer: the order of the peer's indices) side by side into staging; the
        staging's list and the write's slots in it, False if too little staging is free now, None
        if the staging could never hold it."""
        if self._staging is None:
            try:
                self._staging = _Staging(self._agent, self.config.rdma_staging_mb << 20)
            except self._errors as exc:
                what = f"{type(exc).__name__}: {exc}"
                raise TransportError(f"NIXL could not register the staging memory: {what}") from None
        assert self._mapped is not None
        planes = self.local.layout.planes
        count = int(runs[:, 2].sum()) * len(layers) * planes
        if count * length > len(self._staging.buf) - length:  # (room for it, whatever the alignment)
            return None
        start = self._staging.take(count * length, length)
        if start is None:
            return False
        self._staged[write_id] = (start, count * length)
        stage = self._staging.buf[start : start + count * length].reshape(count, length)
        at = 0
        for layer in layers:
            for kv in range(planes):
                view = self._mapped.views[(layer, kv)]
                for a, _, n in runs.tolist():
                    np.copyto(stage[at : at + n], view[a : a + n, offset : offset + length])
                    at += n
        first = start // length
        return self._staging.slots(length), np.arange(first, first + count, dtype=np.int64)

    def _unstage(self, write_id: int) -> None:
        """Write ``write_id`` reads its staging no more: the bytes are free again."""
        taken = self._staged.pop(write_id, None)
        if taken is not None and self._staging is not None:
            self._staging.give(*taken)

    def _check(self, write_id: int, *, starting: bool = False) -> Completion | None:
        handle, deadline, key = self._inflight[write_id]
        try:
            state = self._agent.transfer(handle) if starting else self._agent.check_xfer_state(handle)
        except self._errors as exc:
            return self._finish(write_id, f"write to {key} failed: {type(exc).__name__}: {exc}")
        if state == "DONE":
            return self._finish(write_id, None)
        if state != "PROC":
            return self._finish(write_id, f"write to {key} failed: NIXL state {state}")
        if time.monotonic() > deadline:
            waited = self.config.write_timeout_s
            return self._finish(write_id, f"write to {key} not done after {waited:g}s (peer hung?)")
        return None

    def _finish(self, write_id: int, error: str | None) -> Completion | None:
        """Write ``write_id`` is over (``error``: it failed): its completion once no more of its
        bytes can land, else None (it is kept, and tried again at the next poll)."""
        handle, _, key = self._inflight.pop(write_id)
        try:
            handle.release()
        except self._errors as exc:
            if error is None:  # it is done: nothing of it is in flight, whatever the handle says
                log.warning("releasing a finished NIXL transfer handle failed: %s", exc)
            else:
                return self._stop_landing(write_id, handle, key, error, exc)
        self._unstage(write_id)
        return self.completion(write_id, key, error)

    def _stop_landing(self, write_id: int, handle: Any, key: str, error: str, exc: BaseException) -> Completion | None:
        """A failed write NIXL will not release may still be moving bytes: remove the peer's agent
        (its connections go with it) before saying it failed; if that fails too, keep it."""
        if self._cut(key):
            self._unstage(write_id)
            why = f"NIXL would not release it ({type(exc).__name__}), so the connection to {key} was torn down"
            return self.completion(write_id, key, f"{error}; {why}: nothing more of it can land")
        log.error("write %d to %s failed and can be neither released nor cut off; retrying", write_id, key)
        self._stuck[write_id] = (handle, key, error)
        return None

    def _cut(self, key: str) -> bool:
        """Remove peer ``key``'s agent (True: done, or it was not there); every write in flight to
        it fails now. The next write to it opens it again."""
        remote = self._remotes.get(key)
        if remote is not None:
            try:
                self._agent.remove_remote_agent(remote.name)
            except self._errors as exc:
                log.warning("removing NIXL peer %s: %s", key, exc)
                return False
            del self._remotes[key]
            with contextlib.suppress(*self._errors):
                remote.prepped.release()
                if remote.local is not None:
                    remote.local.release()
        for wid, (handle, _, peer) in list(self._inflight.items()):
            if peer == key:
                del self._inflight[wid]
                with contextlib.suppress(*self._errors):
                    handle.release()
                self._unstage(wid)
                self._done.append(self.completion(wid, key, f"the connection to {key} was torn down"))
        return True

    def _unstick(self) -> list[Completion]:
        out = []
        for wid, (handle, key, error) in list(self._stuck.items()):
            try:
                handle.release()
                why = "released after all"
            except self._errors:
                if not self._cut(key):
                    continue
                why = f"the connection to {key} was torn down"
            del self._stuck[wid]
            self._unstage(wid)
            out.append(self.completion(wid, key, f"{error}; {why}: nothing more of it can land"))
        return out

    def poll(self) -> list[Completion]:
        done = self._unstick() if self._stuck else []
        checked = [c for wid in list(self._inflight) if wid in self._inflight and (c := self._check(wid)) is not None]
        if self._waiting:
            checked += self._start_waiting()
        done, self._done = done + self._done, []  # (writes ended by closing or cutting their peer)
        return done + checked

    def pending(self) -> int:
        return len(self._inflight) + len(self._done) + len(self._stuck) + len(self._waiting)

    def cancel(self, reason: str) -> None:
        """The writes waiting for staging fail now (none of their bytes left); those NIXL has
        are left to finish or time out."""
        for wid, (key, *_) in list(self._waiting.items()):
            del self._waiting[wid]
            self._done.append(self.completion(wid, key, reason))

    def _close_peer(self, key: str) -> None:
        for wid, (peer, *_) in list(self._waiting.items()):
            if peer == key:
                del self._waiting[wid]
                self._done.append(self.completion(wid, key, f"peer {key} was closed"))
        for wid, (_, _, peer) in list(self._inflight.items()):
            if peer == key and wid in self._inflight and (c := self._finish(wid, f"peer {key} was closed")):
                self._done.append(c)
        self._infos.pop(key, None)
        remote = self._remotes.pop(key, None)
        if remote is not None:
            try:
                remote.prepped.release()
                if remote.local is not None:
                    remote.local.release()
                self._agent.remove_remote_agent(remote.name)
            except self._errors as exc:
                log.warning("closing NIXL peer %s: %s", key, exc)

    def close(self) -> None:
        super().close()
        for wid in list(self._inflight):
            if wid in self._inflight:
                self._finish(wid, "transport closed")
        self._stuck.clear()  # the agent goes below: its connections, and what moved on them, with it
        self._staged.clear()
        self._waiting.clear()
        if self._agent is not None:
            try:
                if self._staging is not None:
                    self._staging.close()
                if self._prepped is not None:
                    self._prepped.release()
                if self._reg is not None:
                    self._agent.deregister_memory(self._reg)
            except self._errors as exc:
                log.warning("releasing NIXL registrations: %s", exc)
        self._prepped = self._reg = self._agent = self._staging = None
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
