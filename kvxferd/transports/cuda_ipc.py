"""``cuda_ipc``: GPU memory on one node, through CUDA IPC handles and CuPy.

Theory of operation: engines export their GPU KV memory as CUDA IPC handles
(:mod:`kvxferd.gpucache`): a region names the handle of the allocation that
holds it and its byte offset inside that allocation. The prefill daemon opens
each distinct handle once (``cudaIpcOpenMemHandle`` with lazy peer access) and
keeps the mapping until the cache or the peer goes away; the local cache's
handles likewise. A write copies each run of consecutive blocks, K and V, with
``cudaMemcpyAsync`` on one dedicated non-blocking stream (a slice of each
block, the heads a rank writes into a decode rank of another group size, with
one ``cudaMemcpy2DAsync`` per run: a row per block, or per token of every block
when tokens are outermost) and records an event after the last copy; ``poll``
reports the write when its event completed, or the CUDA error that stopped it.
Nothing synchronises the engine's streams: a layer signal promises the layer's
KV is already written.

A handle cannot be opened by the process that exported it, so the daemon and
the engine must be different processes (they always are). Untested on a GPU
here: see the project notes.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from kvxferd.config import TransportConfig
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import CacheLayout, PeerInfo, Region, RegisterCache
from kvxferd.transports.base import Completion, RunTable, Transport, region_map, span

log = logging.getLogger(__name__)


def _cupy() -> ModuleType:
    try:
        cupy: ModuleType = importlib.import_module("cupy")
    except ImportError as exc:
        raise TransportUnavailable(f"CuPy is not installed (pip install 'kvxferd[cuda]'): {exc}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except RuntimeError as exc:  # CuPy raises a RuntimeError subclass where CUDA cannot run
        raise TransportUnavailable(f"CUDA is not usable here: {exc}") from None
    if count < 1:
        raise TransportUnavailable("CUDA sees no GPU")
    return cupy


class _Handles:
    """IPC handles opened in this process, each once, closed when no cache uses it."""

    def __init__(self, cupy: ModuleType) -> None:
        self.cupy = cupy
        self.base: dict[bytes, int] = {}
        self.users: dict[bytes, set[str]] = {}

    def open(self, handle: bytes, device: int, user: str) -> int:
        if handle not in self.base:
            rt = self.cupy.cuda.runtime
            with self.cupy.cuda.Device(device):
                try:
                    self.base[handle] = int(rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess))
                except RuntimeError as exc:
                    raise TransportError(f"cannot open a CUDA IPC handle on GPU {device}: {exc}") from None
            self.users[handle] = set()
        self.users[handle].add(user)
        return self.base[handle]

    def release(self, user: str) -> None:
        for handle in [h for h, users in self.users.items() if user in users]:
            self.users[handle].discard(user)
            if not self.users[handle]:
                del self.users[handle]
                try:
                    self.cupy.cuda.runtime.ipcCloseMemHandle(self.base.pop(handle))
                except RuntimeError as exc:
                    log.warning("closing a CUDA IPC handle: %s", exc)


def _addresses(
    handles: _Handles, layout: CacheLayout, regions: Sequence[Region], user: str
) -> dict[tuple[int, int], int]:
    out = {}
    for (layer, kv), region in region_map(regions).items():
        if not isinstance(region.handle, bytes):
            raise TransportError(f"{user}: layer {layer} {'KV'[kv]} names no CUDA IPC handle")
        out[(layer, kv)] = handles.open(region.handle, region.device, user) + region.offset
    return out


class CudaIpcTransport(Transport):
    name = "cuda_ipc"
    slices = True  # (untested on a GPU here; the config still refuses GPU groups of different sizes)

    def __init__(self, config: TransportConfig, local: RegisterCache) -> None:
        super().__init__(config, local)
        if local.memory != "gpu":
            raise TransportUnavailable("cuda_ipc moves GPU memory; the local cache is in host memory")
        self._cupy = _cupy()
        self._handles = _Handles(self._cupy)
        self._src: dict[tuple[int, int], int] | None = None
        self._dst: dict[str, dict[tuple[int, int], int]] = {}
        self._device = local.regions[0].device
        self._stream: Any = None
        self._events: dict[int, tuple[Any, str]] = {}  # write id -> (event recorded after its copies, peer)

    def prepare(self) -> None:
        if self._src is None:
            self._src = _addresses(self._handles, self.local.layout, self.local.regions, "local")
            with self._cupy.cuda.Device(self._device):
                self._stream = self._cupy.cuda.Stream(non_blocking=True)

    def _open_peer(self, key: str, peer: PeerInfo) -> None:
        if peer.memory != "gpu":
            raise TransportError(f"peer {key} keeps its cache in {peer.memory} memory; cuda_ipc needs GPU memory")
        self.prepare()
        self._dst[key] = _addresses(self._handles, peer.layout, peer.regions, key)

    def _post(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable) -> Completion | None:
        assert self._src is not None
        cuda = self._cupy.cuda
        local, peer = self.local.layout, self._peers[key]
        block, here, there = local.block_bytes, local.stride, peer.stride  # (strides: padded blocks)
        dst = self._dst[key]
        cut = self._cuts.get(key)
        rt, stream = cuda.runtime, self._stream.ptr
        dense = here == block == there  # runs of whole blocks are contiguous on both sides
        try:
            with cuda.Device(self._device):
                for layer, kv in itertools.product(layers, range(local.planes)):
                    s, d = self._src[(layer, kv)], dst[(layer, kv)]
                    for a, b, n in runs.tolist():
                        if cut is None and dense:
                            rt.memcpyAsync(d + b * there, s + a * here, n * block, rt.memcpyDefault, stream)
                        elif cut is None:  # a row per block
                            rt.memcpy2DAsync(
                                d + b * there, there, s + a * here, here, block, n, rt.memcpyDefault, stream
                            )
                        elif cut.count == 1:  # those bytes of every block: a row per block
                            rt.memcpy2DAsync(
                                d + b * there + cut.dst, there, s + a * here + cut.src, here,
                                cut.length, n, rt.memcpyDefault, stream,
                            )  # fmt: skip
                        else:  # tokens outermost: a row per token, one copy per block (strides may pad blocks)
                            for i in range(n):
                                rt.memcpy2DAsync(
                                    d + (b + i) * there + cut.dst, cut.dst_stride,
                                    s + (a + i) * here + cut.src, cut.src_stride,
                                    cut.length, cut.count, rt.memcpyDefault, stream,
                                )  # fmt: skip
                event = cuda.Event(disable_timing=True)
                event.record(self._stream)
        except RuntimeError as exc:
            return self.completion(write_id, key, f"CUDA copy of layers {span(layers)} to {key} failed: {exc}")
        self._events[write_id] = (event, key)
        return None

    def poll(self) -> list[Completion]:
        done = []
        for write_id, (event, key) in list(self._events.items()):
            try:
                finished = event.done
            except RuntimeError as exc:  # an error on the stream surfaces on the events after it
                del self._events[write_id]
                done.append(self.completion(write_id, key, f"CUDA copy failed: {exc}"))
                continue
            if finished:
                del self._events[write_id]
                done.append(self.completion(write_id, key))
        return done

    def pending(self) -> int:
        return len(self._events)

    def _close_peer(self, key: str) -> None:
        self._sync()
        self._dst.pop(key, None)
        self._handles.release(key)

    def close(self) -> None:
        super().close()
        self._sync()
        self._events.clear()
        self._handles.release("local")
        self._src = None
        self._stream = None

    def _sync(self) -> None:
        """Let copies in flight finish before memory they touch is unmapped."""
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except RuntimeError as exc:
                log.warning("CUDA stream: %s", exc)
