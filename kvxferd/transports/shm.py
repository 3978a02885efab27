"""``shm``: host memory on one host, through POSIX shared-memory segments.

Theory of operation: the engines create their caches as shared-memory
segments (:mod:`kvxferd.kvcache`). The prefill daemon maps its own cache read
only and each decode rank's cache read-write, once per peer, as numpy byte
views of ``[num_blocks, block_bytes]`` per layer and K/V. A write copies each
run of consecutive blocks with one ``numpy.copyto`` for K and one for V and
completes synchronously; a peer written a slice of each block (the KV heads
this rank writes there, see :mod:`kvxferd.core.rankmap`) gets a strided copy
of those bytes of every block of the run (of every token of every block, for
a token-major cache), still one call per run. Before each write the peer's segments are checked
(``fstat``): a segment its engine unlinked means the peer is gone, and the
write fails instead of filling orphaned memory. A peer whose segments are the
local cache's own files (by inode, whatever the name) is refused at open.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvxferd.config import TransportConfig
from kvxferd.errors import TransportError
from kvxferd.protocol import CacheLayout, PeerInfo, RegisterCache
from kvxferd.shm import Segment
from kvxferd.transports.base import Completion, RunTable, Transport, region_map

Views = dict[tuple[int, int], np.ndarray[Any, np.dtype[np.uint8]]]


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
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


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

    def _post(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable) -> Completion:
        dst = self._dst[key]
        gone = dst.gone()
        if gone is not None:
            return self.completion(write_id, key, f"peer {key} is gone: its segment {gone!r} was removed")
        src = self._source()
        rows = runs.tolist()
        cut = self._cuts.get(key)
        for layer, kv in itertools.product(layers, range(self.local.layout.planes)):
            s, d = src.views[(layer, kv)], dst.views[(layer, kv)]
            if cut is not None and cut.count == 1:  # the same bytes of every block: one strided copy per run
                s = s[:, cut.src : cut.src + cut.length]
                d = d[:, cut.dst : cut.dst + cut.length]
            elif cut is not None:  # tokens outermost: those bytes of every token of every block
                s = _tokens(s, cut.count, cut.src_stride)[:, :, cut.src : cut.src + cut.length]
                d = _tokens(d, cut.count, cut.dst_stride)[:, :, cut.dst : cut.dst + cut.length]
            for a, b, n in rows:
                np.copyto(d[b : b + n], s[a : a + n])
        return self.completion(write_id, key)

    def _close_peer(self, key: str) -> None:
        mapped = self._dst.pop(key, None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        super().close()
        if self._src is not None:
            self._src.close()
            self._src = None
