"""The transport interface: register memory, open peers, write block runs, poll, close.

A transport object lives in one daemon. On a decode daemon it *exposes* the
registered cache (``publish`` returns what peers need, e.g. an RDMA agent's
metadata). On a prefill daemon it *writes*: ``open_peer`` maps a decode
rank's cache from its :class:`~kvxferd.protocol.PeerInfo`, ``post`` starts
copying runs of one layer (K and V), and ``poll`` returns finished writes.

Every run is checked against both registered layouts before anything is
copied (:meth:`Transport.post`), so no peer and no engine message can make a
daemon touch memory outside what was registered.

Implementations are registered by import string in
:data:`kvxferd.transports.REGISTRY` and imported only when used.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kvxferd.config import TransportConfig
from kvxferd.core.effects import Run
from kvxferd.core.rankmap import Cut
from kvxferd.errors import TransportError
from kvxferd.protocol import CacheLayout, PeerInfo, Region, RegisterCache

#: Runs of one write as an ``int64 [n, 3]`` array of (src, dst, length).
RunTable = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished write: ``error`` is None on success, else a sentence saying what went wrong.

    Every completion a transport returns names the transport and the peer (the key the peer was
    opened under) it went to, so its owner can tell where it went without remembering each write.
    """

    write_id: int
    error: str | None = None
    refused: bool = False  # never started (our own checks said no): says nothing about the peer
    transport: str | None = None
    peer: str | None = None


def run_table(runs: Sequence[Run]) -> RunTable:
    """Runs as an ``int64 [n, 3]`` array of (src, dst, length): one conversion, then vector checks."""
    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=3 * len(runs))
    return flat.reshape(-1, 3)


def check_runs(table: RunTable, local: CacheLayout, remote: CacheLayout, layers: Sequence[int]) -> str | None:
    """Why these runs of these layers may not be copied, or None if they may."""
    if not layers:
        return "no layers"
    low, top = min(layers), max(layers)
    if low < 0 or top >= local.num_layers or top >= remote.num_layers:
        bad = low if low < 0 else top
        return f"layer {bad} is outside the registered caches ({local.num_layers} / {remote.num_layers} layers)"
    if not len(table):
        return "no runs"
    # Few numpy calls: their fixed cost, not the run count, dominates small writes.
    low = table.min(axis=0)
    if low[0] < 0 or low[1] < 0 or low[2] <= 0:
        bad = int(np.flatnonzero((table[:, :2] < 0).any(axis=1) | (table[:, 2] <= 0))[0])
        return f"malformed run {tuple(int(v) for v in table[bad])}"
    ends = table[:, :2] + table[:, 2:]
    high = ends.max(axis=0)
    for side, limit, what in (
        (0, local.num_blocks, "source blocks {}..{} exceed the {} registered"),
        (1, remote.num_blocks, "destination blocks {}..{} exceed the peer's {}"),
    ):
        if high[side] > limit:
            i = int(np.argmax(ends[:, side]))
            return what.format(int(table[i, side]), int(ends[i, side]) - 1, limit)
    return None


def check_compatible(local: CacheLayout, remote: CacheLayout, cut: Cut | None = None) -> None:
    """Refuse a peer whose cache cannot take this one's blocks (or, with ``cut``, that slice of
    each block into that place of each of its blocks)."""
    if local.num_layers != remote.num_layers or local.planes != remote.planes:
        raise TransportError(
            f"cache layouts differ: local {local.num_layers} layers x {local.planes} regions, "
            f"peer {remote.num_layers} layers x {remote.planes} regions"
        )
    if cut is None and local.block_bytes != remote.block_bytes:
        raise TransportError(
            f"cache layouts differ: local {local.block_bytes} B blocks, peer {remote.block_bytes} B blocks"
        )
    if cut is not None and (
        min(cut.src, cut.dst) < 0
        or cut.length <= 0
        or cut.count < 1
        or (cut.count > 1 and min(cut.src_stride, cut.dst_stride) < cut.length)
        or cut.end(0) > local.block_bytes
        or cut.end(1) > remote.block_bytes
    ):
        raise TransportError(
            f"bytes {cut.src}..{cut.end(0)} of each {local.block_bytes} B block into bytes "
            f"{cut.dst}..{cut.end(1)} of each of the peer's {remote.block_bytes} B blocks do not fit "
            f"({cut.count} piece(s) of {cut.length} B)"
        )


def region_map(regions: Sequence[Region]) -> dict[tuple[int, int], Region]:
    return {(r.layer, r.kv): r for r in regions}


class Transport(ABC):
    """Base class of every transport. Subclasses implement the underscore methods."""

    name: ClassVar[str]
    #: whether it writes a slice of each block (KV heads) as well as whole blocks
    slices: ClassVar[bool] = False

    def __init__(self, config: TransportConfig, local: RegisterCache) -> None:
        self.config = config
        self.local = local
        self._peers: dict[str, CacheLayout] = {}
        self._cuts: dict[str, Cut] = {}  # peers written a slice of each block (the others: whole blocks)

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Do the local set-up now (map or register the local cache) rather than at the first write."""

    # -- target side (decode) ---------------------------------------------------

    def publish(self) -> bytes | None:
        """Metadata peers need to write into ``local`` (None: the regions suffice)."""
        return None

    # -- initiator side (prefill) -------------------------------------------------

    def open_peer(self, key: str, peer: PeerInfo, cut: Cut | None = None) -> None:
        """Prepare to write into ``peer``'s cache (``cut``: bytes ``cut.src ..`` of each source
        block into bytes ``cut.dst ..`` of each destination block, the heads this rank writes
        there; None: whole blocks); raises TransportError with the reason."""
        check_compatible(self.local.layout, peer.layout, cut)
        if cut is not None and not self.slices:
            raise TransportError(f"{self.name} does not write slices of blocks (KV heads) in this version")
        if cut is None:
            self._cuts.pop(key, None)
        else:
            self._cuts[key] = cut
        self._open_peer(key, peer)
        self._peers[key] = peer.layout

    def post(self, write_id: int, key: str, layers: Sequence[int], runs: Sequence[Run]) -> Completion | None:
        """Start writing ``runs`` of each of ``layers`` (K and V) to peer ``key``, as one write.

        Returns a Completion at once if the write was refused or finished
        synchronously; otherwise the completion comes from :meth:`poll`.
        """
        remote = self._peers.get(key)
        if remote is None:
            return self.completion(write_id, key, f"peer {key} is not open")
        table = run_table(runs)
        problem = check_runs(table, self.local.layout, remote, layers)
        if problem is not None:
            return self.completion(write_id, key, f"refused before writing: {problem}", refused=True)
        try:
            return self._post(write_id, key, layers, table)
        except TransportError as exc:
            return self.completion(write_id, key, str(exc))

    def completion(self, write_id: int, key: str, error: str | None = None, *, refused: bool = False) -> Completion:
        """The completion of write ``write_id`` to peer ``key``, stamped with this transport."""
        return Completion(write_id, error, refused, self.name, key)

    def poll(self) -> list[Completion]:
        """Writes that finished since the last call."""
        return []

    def pending(self) -> int:
        """Writes posted and not yet returned by :meth:`poll` (0 for synchronous transports)."""
        return 0

    #: set by the transport's owner: whether anything waits for its loop (a transport that works in
    #: poll stops then; None: it stops after a slice of its own)
    interrupted: Callable[[], bool] | None = None

    def cancel(self, reason: str) -> None:  # noqa: B027 - optional hook
        """Stop what is in flight from landing any more bytes, where this transport can (each
        write then completes as failed with ``reason``); one that cannot leaves them be."""

    def busy(self) -> bool:
        """Whether :meth:`poll` has work of its own to do now (a copy it moves a slice at a time):
        the loop then polls again at its next turn instead of backing off."""
        return False

    def close_peer(self, key: str) -> None:
        self._cuts.pop(key, None)
        if self._peers.pop(key, None) is not None:
            self._close_peer(key)

    def close(self) -> None:
        for key in list(self._peers):
            self.close_peer(key)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -----------------------------------------------------------

    @abstractmethod
    def _open_peer(self, key: str, peer: PeerInfo) -> None: ...

    @abstractmethod
    def _post(self, write_id: int, key: str, layers: Sequence[int], runs: RunTable) -> Completion | None:
        """Copy ``runs`` (already checked against both layouts) of each of ``layers``, K and V."""

    def _close_peer(self, key: str) -> None:  # noqa: B027 - optional hook
        pass


def span(layers: Sequence[int]) -> str:
    """``layers`` for a message: "3", or "0..31" when they are consecutive, else as listed."""
    if len(layers) == 1:
        return str(layers[0])
    if list(layers) == list(range(layers[0], layers[0] + len(layers))):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))
