"""Writes: what a prefill rank posts, and the one table of writes in flight.

Theory of operation
-------------------
Agreement is per request; the data plane is not. When layer L of a step is
ready, every admitted job with a chunk in that step can write layer L: the
caller hands :meth:`Writes.plan` those (request, chunk, layer) items and gets
back one :class:`~kvxferd.core.effects.Write` per (peer, transport, decode
registration) and set of blocks: runs merged across requests, so a step of eight requests is eight
requests' blocks in one write, not eight writes; and the layers ready together whose merged
runs are the same are one write too, up to :data:`JOINED_BYTES` (a short job admitted after its
layers were signalled: one write for all of them). Each write names its parts
(:class:`~kvxferd.core.request.Part`); this table keeps them until the
transport reports the write (:meth:`Writes.done`), and it is the only record
of writes in flight a rank keeps: a link or a transport may know a write is
out, but only this table knows what it carries. A chunk that completed no
block has nothing to send: its layers count as written at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import count

from kvxferd.core.blocks import merge_runs
from kvxferd.core.effects import Run, Write
from kvxferd.core.intake import Item
from kvxferd.core.progress import StepTable
from kvxferd.core.request import Part, Request
from kvxferd.core.settings import RankSettings
from kvxferd.protocol import Key

#: the generation a KVReady names when its request's writes went into more than one registration
MIXED = "several registrations"
#: most bytes of one write that joins several layers: joining saves a write's fixed cost (Python,
#: a NIXL transfer, a completion), which only matters for small ones; a large write stays one
#: layer, so no single post holds the loop (NIXL may copy inline) much longer than one layer's
JOINED_BYTES = 4 << 20


class Writes:
    def __init__(self, settings: RankSettings) -> None:
        self.num_layers = settings.num_layers
        self.rank = settings.rank  # the decode rank this rank writes to (one per prefill rank)
        self.unit = settings.block_bytes * settings.planes  # bytes of one block of one layer, K and V
        self._parts: dict[int, tuple[Part, ...]] = {}  # write id -> what it carries
        self._ids = count(1)

    def plan(
        self, items: list[Item], requests: Mapping[Key, Request], steps: StepTable
    ) -> tuple[list[Write], list[Request]]:
        """The writes for ``items`` (those of requests that may write, each layer once), and the
        requests some of whose layers counted as written at once (a chunk with no blocks)."""
        groups: dict[tuple[str, str, tuple[str, ...], int], list[tuple[tuple[Run, ...], Part]]] = {}
        finished: dict[Key, Request] = {}
        unit = self.unit
        for key, index, layer in items:
            req = requests[key]
            chunk = req.chunks[index]
            if layer in chunk.posted or not req.writing:
                continue
            chunk.posted.add(layer)
            if len(chunk.posted) == self.num_layers:
                steps.leave(chunk.step, key)
            if not chunk.runs:
                chunk.confirmed.add(layer)
                finished[key] = req
                continue
            nbytes = chunk.blocks * unit
            info = req.info
            group = groups.setdefault((info.peer, info.transport, info.dst_generations, layer), [])
            group.append((chunk.runs, Part(key, index, layer, nbytes)))
            req.inflight += 1
        # the requests of a layer share writes of up to JOINED_BYTES (a short request is never tied
        # to a large one's write), and the layers whose blocks are the same go together, up to
        # JOINED_BYTES a write too
        together: dict[tuple[str, str, tuple[str, ...], tuple[Run, ...]], list[tuple[int, list[Part]]]] = {}
        joins: dict[tuple[Run, ...], tuple[Run, ...]] = {}  # the same requests' runs, layer after layer
        for (peer, transport, generations, layer), group in groups.items():
            for runs, parts in _packs(group):
                merged = tuple(runs)  # (a chunk's own are merged)
                if len(parts) > 1:
                    merged = joins.get(merged) or joins.setdefault(merged, merge_runs(runs))
                together.setdefault((peer, transport, generations, merged), []).append((layer, parts))
        writes = []
        for (peer, transport, generations, merged), layers in together.items():
            per_layer = sum(p.nbytes for p in layers[0][1])  # (the same blocks in every one of them)
            step = max(1, JOINED_BYTES // per_layer)
            for first in range(0, len(layers), step):
                joined = layers[first : first + step]
                carried = tuple(p for _, ps in joined for p in ps)
                write_id = next(self._ids)
                self._parts[write_id] = carried
                keys = tuple(dict.fromkeys(p.key for p in carried))
                nbytes = per_layer * len(joined)
                layer_ids = tuple(layer for layer, _ in joined)
                writes.append(Write(write_id, peer, transport, layer_ids, merged, keys, nbytes, generations))
        writes.sort(key=lambda w: w.nbytes)  # the short ones first: a large one may be slow to post
        return writes, list(finished.values())

    def complete(
        self,
        write_id: int,
        requests: Mapping[Key, Request],
        error: str | None,
        transport: str | None,
        generation: str | None,
    ) -> tuple[list[Request], list[tuple[Request, int]]] | None:
        """The transport finished write ``write_id`` (None: not a write in flight here). Credits
        its parts to the live requests it served, which it returns, with the (request, layer)
        parts that failed."""
        parts = self._parts.pop(write_id, None)
        if parts is None:
            return None
        touched: dict[Key, Request] = {}
        failed: list[tuple[Request, int]] = []
        for part in parts:
            req = requests.get(part.key)
            if req is None:
                continue  # it ended (a verdict, a forced stop) while the write was out
            touched[part.key] = req
            req.inflight -= 1
            req.transport = req.transport or transport
            if generation is not None and req.generation != generation:
                req.generation = generation if req.generation is None else MIXED
            if error is None:
                req.chunks[part.chunk].confirmed.add(part.layer)
                req.bytes_done += part.nbytes
            else:
                failed.append((req, part.layer))
        return list(touched.values()), failed

    def written(self, req: Request) -> bool:
        """Every layer of every chunk of ``req`` is confirmed written, and its last chunk came."""
        if req.inflight or req.next_token < req.info.num_tokens:
            return False
        return all(len(c.confirmed) == self.num_layers for c in req.chunks)

    def give_up(self, req: Request) -> int:
        """Give up the parts of ``req``'s writes in flight (their transport never reported);
        returns how many there were."""
        key = req.key
        self._parts = {
            wid: kept for wid, parts in self._parts.items() if (kept := tuple(p for p in parts if p.key != key))
        }
        lost, req.inflight = req.inflight, 0
        return lost

    def clear(self) -> None:
        self._parts.clear()

    def holds(self, key: Key) -> bool:
        return any(p.key == key for parts in self._parts.values() for p in parts)

    def __len__(self) -> int:
        return len(self._parts)


def _packs(group: list[tuple[tuple[Run, ...], Part]]) -> list[tuple[list[Run], list[Part]]]:
    """The parts of one layer in writes of up to JOINED_BYTES (one larger than that alone)."""
    packs: list[tuple[list[Run], list[Part]]] = []
    size = 0
    for runs, part in group:
        if not packs or size + part.nbytes > JOINED_BYTES:
            packs.append(([], []))
            size = 0
        packs[-1][0].extend(runs)
        packs[-1][1].append(part)
        size += part.nbytes
    return packs
