"""The rank map: which prefill rank writes which heads of which decode rank, decided once.

Theory of operation
-------------------
A KV cache split by heads gives each of a group's ``n`` ranks ``H / n`` of the
model's ``H`` KV heads (``n <= H``, ``n`` divides ``H``); above the head count
each head is replicated on ``n / H`` consecutive ranks (``H`` divides ``n``) and
each rank holds one. A *replicated* cache (a latent, MLA-style cache) is the
same on every rank. Given both groups, :func:`rank_map` says, for every decode
rank, which prefill ranks write into it and which heads each writes
(:class:`Slice`): every head a decode rank holds has exactly one writer, and
where several prefill ranks hold a head (replicas) the writers are spread over
them, so no prefill rank writes more than its share. A prefill rank that writes
nothing to a decode rank still takes part in the agreement on every request.

A map that cannot work is refused here, at start-up, naming both groups and the
numbers, never found later as a per-request failure. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvxferd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Group:
    """A group as the map sees it: its name (for messages) and its number of ranks."""

    name: str
    ranks: int


@dataclass(frozen=True, slots=True)
class Slice:
    """Prefill rank ``prefill`` writes its local heads ``src[0]:src[1]`` into the local heads
    ``dst[0]:dst[1]`` of decode rank ``decode`` (the same number of heads, in order)."""

    prefill: int
    decode: int
    src: tuple[int, int]
    dst: tuple[int, int]

    @property
    def heads(self) -> int:
        return self.src[1] - self.src[0]


@dataclass(frozen=True, slots=True)
class Cut:
    """Where a slice lies inside one block of one region, in bytes: the prefill rank copies
    ``count`` pieces of ``length`` bytes, piece ``i`` from ``src + i * src_stride`` of each source
    block to ``dst + i * dst_stride`` of its destination block. Heads outermost inside a block
    (HND): a run of heads is one piece (``count`` 1). Tokens outermost (NHD): one piece per token."""

    src: int
    dst: int
    length: int
    count: int = 1
    src_stride: int = 0
    dst_stride: int = 0

    def end(self, side: int) -> int:
        """One past the last byte it touches in a block (``side`` 0: source, 1: destination)."""
        start, stride = (self.src, self.src_stride) if side == 0 else (self.dst, self.dst_stride)
        return start + (self.count - 1) * stride + self.length


def cut_of(piece: Slice, head_bytes: int, src_block: int, dst_block: int, tokens: int = 1) -> Cut | None:
    """The bytes of ``piece`` inside a block, for blocks whose heads take ``head_bytes`` each
    (``tokens``: the block's tokens when they are outermost inside it; 1: heads are), or None:
    the whole block on both sides, the common case, copied as is."""
    if tokens == 1:
        cut = Cut(piece.src[0] * head_bytes, piece.dst[0] * head_bytes, piece.heads * head_bytes)
        return None if cut == Cut(0, 0, src_block) and src_block == dst_block else cut
    row = head_bytes // tokens  # one head of one token
    src_row, dst_row = src_block // tokens, dst_block // tokens  # one token of all the rank's heads
    if piece.heads * row == src_row == dst_row:
        return None
    return Cut(piece.src[0] * row, piece.dst[0] * row, piece.heads * row, tokens, src_row, dst_row)


@dataclass(frozen=True, slots=True)
class RankMap:
    prefill: Group
    decode: Group
    heads: int  # the model's KV heads (1 for a replicated cache: it is not split)
    replicated: bool
    slices: tuple[Slice, ...]

    def writes_of(self, prefill_rank: int) -> tuple[Slice, ...]:
        """What prefill rank ``prefill_rank`` writes, decode rank by decode rank."""
        return tuple(s for s in self.slices if s.prefill == prefill_rank)

    def writers_of(self, decode_rank: int) -> tuple[int, ...]:
        """The prefill ranks whose writes decode rank ``decode_rank`` waits for."""
        return tuple(sorted({s.prefill for s in self.slices if s.decode == decode_rank}))

    @property
    def identity(self) -> bool:
        """Prefill rank r writes all of decode rank r and nothing else (the same TP on both sides)."""
        return len(self.slices) == self.prefill.ranks == self.decode.ranks and all(
            s.prefill == s.decode for s in self.slices
        )


def local_heads(group: Group, heads: int) -> int:
    """KV heads each rank of ``group`` holds (1 above the head count: replicas)."""
    return heads // group.ranks if group.ranks <= heads else 1


def held(group: Group, heads: int, rank: int) -> tuple[int, int]:
    """The model's heads ``[first, end)`` rank ``rank`` of ``group`` holds."""
    if group.ranks <= heads:
        per = heads // group.ranks
        return rank * per, (rank + 1) * per
    head = rank // (group.ranks // heads)
    return head, head + 1


def check(group: Group, heads: int, role: str) -> None:
    """Refuse a group whose ranks cannot split ``heads`` evenly, naming it and the numbers."""
    n = group.ranks
    if n <= heads and heads % n:
        raise ConfigError(
            f"{role} group {group.name!r} has {n} ranks, which do not split the model's {heads} KV heads "
            f"evenly ({heads} / {n} is not whole); use a rank count that divides {heads}"
        )
    if n > heads and n % heads:
        raise ConfigError(
            f"{role} group {group.name!r} has {n} ranks, more than the model's {heads} KV heads but not a "
            f"multiple of them: each head must be held by the same number of ranks"
        )


def rank_map(prefill: Group, decode: Group, heads: int, *, replicated: bool = False) -> RankMap:
    """The map from ``prefill``'s ranks to ``decode``'s for a cache of ``heads`` KV heads
    (``replicated``: the same on every rank). Raises ConfigError for a map that cannot work."""
    if prefill.ranks < 1 or decode.ranks < 1 or heads < 1:
        raise ConfigError(f"groups and heads must be positive: {prefill}, {decode}, {heads} heads")
    if replicated:  # every prefill rank holds everything: one writer per decode rank, spread
        slices = tuple(Slice(d % prefill.ranks, d, (0, 1), (0, 1)) for d in range(decode.ranks))
        return RankMap(prefill, decode, 1, True, slices)
    check(prefill, heads, "prefill")
    check(decode, heads, "decode")
    out: list[Slice] = []
    replicas = max(1, prefill.ranks // heads)  # prefill ranks holding each head
    for d in range(decode.ranks):
        first, end = held(decode, heads, d)
        # the decode rank's heads, run by run of the prefill rank that holds them; among replicas
        # of a head, decode rank d takes replica d % replicas (spread, and the same one for every
        # head of a run, so a run stays one contiguous write)
        head = first
        while head < end:
            if prefill.ranks <= heads:
                per = heads // prefill.ranks
                p = head // per
                stop = min(end, (p + 1) * per)
                src = (head - p * per, stop - p * per)
            else:
                p = head * replicas + d % replicas
                stop = head + 1
                src = (0, 1)
            out.append(Slice(p, d, src, (head - first, stop - first)))
            head = stop
    return RankMap(prefill, decode, heads, False, tuple(out))
