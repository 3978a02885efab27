"""``shm``: host memory on one host, through POSIX shared-memory segments.

Theory of operation: the engines create their caches as shared-memory
segments (:mod:`kvxferd.kvcache`). The prefill daemon maps its own cache read
only and each decode rank's cache read-write, once per peer, as numpy byte
views of ``[num_blocks, block_bytes]`` per layer and K/V, and, where the
registration puts every region in one segment at a fixed distance from the
last (every engine we know does), as one ``[layers, K|V, blocks, bytes]`` view
besides. A short write copies each run of consecutive blocks with one
``numpy.copyto`` for all its consecutive layers, K and V together (else one per
layer and K/V) and completes synchronously; a peer written a slice of each
block (the KV heads this rank writes there, see :mod:`kvxferd.core.rankmap`)
gets a strided copy of those bytes of every block of the run (of every token of
every block, for a token-major cache: one call per layer and K/V).

A write of up to :data:`SLICE_BYTES` is copied at once and completes synchronously. A larger one
is queued and copied by :meth:`ShmTransport.poll` a slice of each queued write in turn, until
something waits to be read (asked every :data:`POLL_S`), and the loop polls again at its next turn while any is
left (:meth:`ShmTransport.busy`): between two slices it reads what came (layer signals,
verdicts, its heartbeat), so a 256 MiB request never stops the daemon from taking the next
request's signals for longer than a slice takes, and a short write posted meanwhile is not
queued behind the large one's remaining bytes. Closing a peer drops its queued writes (they
complete as failed at the next poll; nothing more of them lands), and so does :meth:`cancel`,
which the daemon calls when it finds it did not run for a while (its fence): a poll that sees two
of its slices :data:`STOPPED_S` apart returns before the next one, so it is asked first.

Before each write the peer's segments are checked
(``fstat``): a segment its engine unlinked means the peer is gone, and the
write fails instead of filling orphaned memory; a large write is checked again
when its last slice is copied, and fails if the segment went meanwhile. A peer whose segments are the
local cache's own files (by inode, whatever the name) is refused at open.
"""

from __future__ import annotations

import bisect
import itertools
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvxferd.config import TransportConfig
from kvxferd.errors import TransportError
from kvxferd.protocol import CacheLayout, PeerInfo, Region, RegisterCache
from kvxferd.shm import Segment
from kvxferd.transports.base import Completion, RunTable, Transport, region_map

Views = dict[tuple[int, int], np.ndarray[Any, np.dtype[np.uint8]]]
Pairs = list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]
Row = tuple[int, int, int]

#: a write up to this many bytes is copied at once; a larger one a slice of this size at a time
SLICE_BYTES = 1 << 20
#: one poll copies slices (of each queued write in turn) and every POLL_S asks its owner whether
#: anything waits to be read (Transport.interrupted): it returns then, else it goes on, so what
#: comes meanwhile (a layer signal, a verdict) waits no longer than that, and a loop with nothing
#: else to do does not pay a turn every POLL_S; at most POLL_MAX_S or POLL_BYTES in one call (the
#: loop's timers, its heartbeat, run between two calls). Against 0.5 ms, in turn on one build: a
#: short request's signal to its bytes at decode while 256 MiB move, p50 0.56 vs 0.72-0.80 ms; the
#: 256 MiB rows the same (asking costs a poll of the daemon's sockets). The p99 (1.7-3.9 ms) is set
#: by ZMQ's I/O thread: woken on the copying core, it waits for the copy's time slice to end before
#: it hands the message over. A sched_yield before each ask brought that p99 to 1.0-1.1 ms, but
#: raised the demo's latency (two prefill ranks copying on two cores: p50 11-15 -> 15-20 ms, also
#: when yielding once a millisecond), so it is not done.
POLL_S = 0.2e-3
POLL_MAX_S = 20e-3
POLL_BYTES = 256 << 20
#: a gap this long between two slices means the process did not run (SIGSTOP): poll returns at
#: once, so the loop's fence decides whether what is queued may still be written (see cancel)
STOPPED_S = 0.1


@dataclass
class _Copy:
    """A write being copied a slice at a time: the runs ``rows`` of each (destination, source) view
    pair (one per layer and K/V), and how far it got (view ``v``, row ``r``, blocks ``off`` of it)."""

    write_id: int
    key: str
    views: Pairs
    rows: list[Row]
    v: int = 0
    r: int = 0
    off: int = 0
    error: str | None = None  # set when its peer was closed: it completes as failed
    blocks: list[int] = field(default_factory=list)  # blocks in rows[:i], for each i (set on creation)

    def __post_init__(self) -> None:
        self.blocks = [0, *itertools.accumulate(n for _, _, n in self.rows)]

    @property
    def done(self) -> bool:
        return self.v >= len(self.views)

    def slice(self, most: int) -> int:
        """Copy about ``most`` bytes from where it got to (at least one block); the bytes copied.
        (Runs of one block are common: the whole runs that fit go in a plain loop.)"""
        copied, rows, views, blocks = 0, self.rows, self.views, self.blocks
        nrows = len(rows)
        while self.v < len(views) and copied < most:
            d, s = views[self.v]
            per = d[0].nbytes  # bytes of one block in this view
            r, off = self.r, self.off
            if off:  # the rest of a run copied in part
                a, b, n = rows[r]
                take = min(n - off, max(1, (most - copied) // per))
                np.copyto(d[b + off : b + off + take], s[a + off : a + off + take])
                copied += take * per
                off += take
                if off == n:
                    r, off = r + 1, 0
            if not off and r < nrows and copied < most:  # every whole run that fits, then a part
                k = bisect.bisect_right(blocks, blocks[r] + (most - copied) // per, r) - 1
                for a, b, n in rows[r:k]:
                    np.copyto(d[b : b + n], s[a : a + n])
                copied += (blocks[k] - blocks[r]) * per
                r = k
                if r < nrows and copied < most:
                    a, b, n = rows[r]
                    take = min(n, max(1, (most - copied) // per))
                    np.copyto(d[b : b + take], s[a : a + take])
                    copied += take * per
                    off = take
                    if off == n:
                        r, off = r + 1, 0
            if r >= nrows:
                self.v, self.r, self.off = self.v + 1, 0, 0
            else:
                self.r, self.off = r, off
        return copied


class MappedCache:
    """Every segment of one registered host-memory cache, mapped into this process, with a
    ``[num_blocks, block_bytes]`` byte view per (layer, kv). Also used by ``rdma``, which
    registers these mappings with NIXL."""

    def __init__(self, cache: RegisterCache | PeerInfo, *, writable: bool, who: str) -> None:
        if cache.memory != "host":
            raise TransportError(f"shm moves host memory; {who}'s cache is in {cache.memory} memory")
        layout: CacheLayout = cache.layout
        regions = region_map(cache.regions)
        self.segments: dict[str, Segment] = {}
        self.fds: list[int] = []
        self.views: Views = {}
        #: ``[layers, planes, blocks, block_bytes]`` over the same bytes as ``views``, where every
        #: region is in one segment at a fixed distance from the last (one copy call moves a run of
        #: every layer ready together, K and V; else None, and copies go view by view)
        self.grid: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        try:
            for (layer, kv), region in regions.items():
                if not isinstance(region.handle, str):
                    raise TransportError(f"{who}: region of layer {layer} names no shared-memory segment")
                seg = self.segments.get(region.handle)
                if seg is None:
                    seg = self.segments[region.handle] = Segment.attach(region.handle, writable=writable)
                    self.fds.append(seg.watch_fd())
                end = region.offset + layout.region_bytes
                if end > seg.size:
                    raise TransportError(
                        f"{who}: layer {layer} {'KV'[kv]} needs bytes {region.offset}..{end} "
                        f"of segment {region.handle!r}, which has {seg.size}"
                    )
                flat = np.frombuffer(seg.buffer, dtype=np.uint8, count=layout.region_bytes, offset=region.offset)
                self.views[(layer, kv)] = np.lib.stride_tricks.as_strided(
                    flat, shape=(layout.num_blocks, layout.block_bytes), strides=(layout.stride, 1), writeable=writable
                )  # (blocks padded to block_stride: the padding is never touched)
            self.grid = _grid(layout, regions, self.segments, writable)
        except BaseException:
            self.close()
            raise

    def gone(self) -> str | None:
        """The name of a segment its owner has unlinked, if any."""
        for fd, name in zip(self.fds, self.segments, strict=True):
            if os.fstat(fd).st_nlink == 0:
                return name
        return None

    def close(self) -> None:
        self.views.clear()
        self.grid = None  # (a view keeps its mapping alive)
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _grid(
    layout: CacheLayout, regions: dict[tuple[int, int], Region], segments: dict[str, Segment], writable: bool
) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """One view of every region, ``[layers, planes, blocks, block_bytes]``, if the registration puts
    region (layer, kv) at ``base + layer * L + kv * P`` of one segment (as every engine we know
    does); None otherwise. Each region was checked to lie within its segment, so the view does."""
    if len(segments) != 1:
        return None
    at = {key: region.offset for key, region in regions.items()}
    base = at[(0, 0)]
    step_l = at[(1, 0)] - base if layout.num_layers > 1 else 0
    step_p = at[(0, 1)] - base if layout.planes > 1 else 0
    if step_l < 0 or step_p < 0:
        return None
    if any(off != base + layer * step_l + kv * step_p for (layer, kv), off in at.items()):
        return None
    seg = next(iter(segments.values()))
    span = step_l * (layout.num_layers - 1) + step_p * (layout.planes - 1) + layout.region_bytes
    flat = np.frombuffer(seg.buffer, dtype=np.uint8, count=span, offset=base)
    grid: np.ndarray[Any, np.dtype[np.uint8]] = np.lib.stride_tricks.as_strided(
        flat,
        shape=(layout.num_layers, layout.planes, layout.num_blocks, layout.block_bytes),
        strides=(step_l, step_p, layout.stride, 1),
        writeable=writable,
    )
    return grid


def _spans(layers: Sequence[int]) -> list[tuple[int, int]]:
    """``layers`` (ascending) as ranges [lo, hi) of consecutive layers."""
    spans: list[tuple[int, int]] = []
    for layer in layers:
        if spans and spans[-1][1] == layer:
            spans[-1] = (spans[-1][0], layer + 1)
        else:
            spans.append((layer, layer + 1))
    return spans


def _tokens(blocks: np.ndarray[Any, np.dtype[np.uint8]], count: int, stride: int) -> np.ndarray[Any, Any]:
    """``[blocks, bytes]`` as ``[blocks, count, stride]``: a view of the same memory (a reshape may
    copy, and a copy would take the writes)."""
    out: np.ndarray[Any, Any] = np.lib.stride_tricks.as_strided(
        blocks,
        shape=(len(blocks), count, stride),
        strides=(blocks.strides[0], stride, 1),
        writeable=blocks.flags.writeable,
    )
    return out


class ShmTransport(Transport):
    name = "shm"
    slices = True

    def __init__(self, config: TransportConfig, local: RegisterCache) -> None:
        super().__init__(config, local)
        self._src: MappedCache | None = None
        self._dst: dict[str, MappedCache] = {}
        self._queue: deque[_Copy] = deque()  # large writes, copied a slice at a time by poll

    def prepare(self) -> None:
        self._source()

    def _source(self) -> MappedCache:
        if self._src is None:
            self._src = MappedCache(self.local, writable=False, who="the local engine")
        return self._src

    def _open_peer(self, key: str, peer: PeerInfo) -> None:
        src = self._source()
        dst = MappedCache(peer, writable=True, who=f"peer {key}")
        own = {seg.inode: name for name, seg in src.segments.items()}
        for name, seg in dst.segments.items():
            if seg.inode in own:
                dst.close()
                raise TransportError(
                    f"peer {key} names segment {name!r}, which is the local engine's own cache "
                    f"({own[seg.inode]!r}): a cache is never written from itself"
                )
        self._dst[key] = dst

    def _post(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable) -> Completion | None:
        dst = self._dst[key]
        gone = dst.gone()
        if gone is not None:
            return self.completion(write_id, key, f"peer {key} is gone: its segment {gone!r} was removed")
        src = self._source()
        rows = runs.tolist()
        cut = self._cuts.get(key)
        per_block = cut.length * cut.count if cut is not None else self.local.layout.block_bytes
        small = int(runs[:, 2].sum()) * per_block * len(layers) * self.local.layout.planes <= SLICE_BYTES
        if small and src.grid is not None and dst.grid is not None and (cut is None or cut.count == 1):
            # one call per run and span of consecutive layers, K and V together
            sg, dg = src.grid, dst.grid
            if cut is not None:
                sg, dg = sg[..., cut.src : cut.src + cut.length], dg[..., cut.dst : cut.dst + cut.length]
            for lo, hi in _spans(layers):
                for a, b, n in rows:
                    np.copyto(dg[lo:hi, :, b : b + n], sg[lo:hi, :, a : a + n])
            return self.completion(write_id, key)
        views: Pairs = []
        for layer, kv in itertools.product(layers, range(self.local.layout.planes)):
            s, d = src.views[(layer, kv)], dst.views[(layer, kv)]
            if cut is not None and cut.count == 1:  # the same bytes of every block: one strided copy per run
                s = s[:, cut.src : cut.src + cut.length]
                d = d[:, cut.dst : cut.dst + cut.length]
            elif cut is not None:  # tokens outermost: those bytes of every token of every block
                s = _tokens(s, cut.count, cut.src_stride)[:, :, cut.src : cut.src + cut.length]
                d = _tokens(d, cut.count, cut.dst_stride)[:, :, cut.dst : cut.dst + cut.length]
            views.append((d, s))
        if small:
            for d, s in views:
                for a, b, n in rows:
                    np.copyto(d[b : b + n], s[a : a + n])
            return self.completion(write_id, key)
        self._queue.append(_Copy(write_id, key, views, rows))
        return None

    def poll(self) -> list[Completion]:
        """Copy a slice of each queued write in turn, up to POLL_BYTES; the writes that finished."""
        done: list[Completion] = []
        start = before = time.monotonic()
        budget, until, last = POLL_BYTES, start + POLL_S, start + POLL_MAX_S
        while self._queue and budget > 0:
            if time.monotonic() - before >= STOPPED_S:  # stopped meanwhile: no more before the loop looked
                break
            job = self._queue.popleft()
            if job.error is None:
                budget -= job.slice(min(SLICE_BYTES, budget))
                mapped = self._dst.get(job.key) if job.done else None  # (closing its peer fails it first)
                if mapped is not None and (gone := mapped.gone()) is not None:
                    job.error = f"peer {job.key} is gone: its segment {gone!r} was removed while it was copied"
            if job.error is not None or job.done:
                done.append(self.completion(job.write_id, job.key, job.error))
            else:
                self._queue.append(job)
            now = before = time.monotonic()
            if now >= until:
                if now >= last or self.interrupted is None or self.interrupted():
                    break
                until = now + POLL_S
        return done

    def pending(self) -> int:
        return len(self._queue)

    def cancel(self, reason: str) -> None:
        """No more bytes of any queued write land: each completes as failed with ``reason`` at
        the next poll (a prefill rank back from a stop its peers may have taken for death)."""
        for job in self._queue:
            if job.error is None:
                job.error, job.views = reason, []  # (its views kept the peer's mapping alive)

    def busy(self) -> bool:
        return bool(self._queue)

    def _close_peer(self, key: str) -> None:
        for job in self._queue:  # nothing more of them lands; they fail at the next poll
            if job.key == key and job.error is None:
                job.error, job.views = f"peer {key} was closed while the write was being copied", []
        mapped = self._dst.pop(key, None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        super().close()  # (every peer closed: whatever was queued is given up, lands no more)
        self._queue.clear()
        if self._src is not None:
            self._src.close()
            self._src = None
