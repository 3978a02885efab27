"""Block arithmetic: which blocks a prefill chunk completes, runs, digests.

Theory of operation: a request's prompt of ``num_tokens`` tokens occupies
``ceil(num_tokens / block_tokens)`` blocks. After a chunk ending at token
``end`` has been computed, the blocks wholly covered by tokens ``[0, end)`` are
complete, and at the final chunk the partly filled last block is complete too.
So a chunk sends the blocks between what earlier chunks sent and that bound,
which means chunk boundaries need not align with blocks. A block list becomes
*runs*: maximal stretches where source and destination ids both count up by
one, so a transport can move each stretch with one descriptor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from kvxferd.core.effects import Run


def blocks_needed(num_tokens: int, block_tokens: int) -> int:
    return -(-num_tokens // block_tokens)


def blocks_complete(end_token: int, num_tokens: int, block_tokens: int) -> int:
    """How many leading blocks are complete once tokens ``[0, end_token)`` are computed."""
    if end_token >= num_tokens:
        return blocks_needed(num_tokens, block_tokens)
    return end_token // block_tokens


def runs_of(src: Sequence[int], dst: Sequence[int]) -> list[Run]:
    """Coalesce paired block ids into maximal runs, in the order given."""
    runs: list[Run] = []
    start = 0
    n = len(src)
    for i in range(1, n + 1):
        if i == n or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append(Run(src[start], dst[start], i - start))
            start = i
    return runs


def merge_runs(runs: Iterable[Run]) -> tuple[Run, ...]:
    """Sort runs by source and join neighbours that continue each other on both sides.

    Used when several requests' runs for one layer go to one peer in one write.
    """
    ordered = sorted(runs)
    if not ordered:
        return ()
    merged: list[Run] = []
    src, dst, length = ordered[0]
    for s, d, n in ordered[1:]:  # hot with thousands of small runs: plain locals, no attribute lookups
        if s == src + length and d == dst + length:
            length += n
        else:
            merged.append(Run(src, dst, length))
            src, dst, length = s, d, n
    merged.append(Run(src, dst, length))
    return tuple(merged)


def fingerprint(
    request_id: str,
    num_tokens: int,
    src: Sequence[int],
    dst: Sequence[int],
    chunks: Iterable[tuple[int, int, int]],
    num_layers: int,
) -> str:
    """A short hash of what a request is and how it was chunked.

    It depends only on the request and the steps that computed it, never on
    the order messages arrived in, so ranks that did the same job agree.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{request_id}|{num_tokens}|{num_layers}|".encode())
    h.update(",".join(map(str, src)).encode() + b"|")
    h.update(",".join(map(str, dst)).encode() + b"|")
    h.update(";".join(f"{s}:{o}:{c}" for s, o, c in chunks).encode())
    return h.hexdigest()
