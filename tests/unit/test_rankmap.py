"""The rank map (kvxferd.core.rankmap): every head a decode rank holds has exactly one writer,
which holds that head; writers are spread over replicas; impossible maps are refused by name."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from kvxferd.core.rankmap import Group, held, local_heads, rank_map
from kvxferd.errors import ConfigError

SIZES = (1, 2, 4, 8)
HEADS = (1, 2, 4, 8, 16)


@pytest.mark.parametrize(("p", "d", "h"), list(itertools.product(SIZES, SIZES, HEADS)))
def test_every_decode_head_has_exactly_one_writer_that_holds_it(p: int, d: int, h: int) -> None:
    pre, dec = Group("prefill", p), Group("decode", d)
    m = rank_map(pre, dec, h)
    for rank in range(d):
        first, end = held(dec, h, rank)
        covered: Counter[int] = Counter()
        for s in (s for s in m.slices if s.decode == rank):
            assert 0 <= s.src[0] < s.src[1] <= local_heads(pre, h), s
            assert 0 <= s.dst[0] < s.dst[1] <= local_heads(dec, h), s
            assert s.src[1] - s.src[0] == s.dst[1] - s.dst[0], s
            pfirst, _ = held(pre, h, s.prefill)
            for i in range(s.heads):
                head = first + s.dst[0] + i
                assert pfirst + s.src[0] + i == head, f"{s}: prefill rank {s.prefill} does not hold head {head}"
                covered[head] += 1
        assert covered == Counter(range(first, end)), f"decode rank {rank}: heads written {dict(covered)}"
        assert m.writers_of(rank), f"decode rank {rank} has no writer"
    assert m.identity == (p == d)


@pytest.mark.parametrize(("p", "d", "h"), list(itertools.product(SIZES, SIZES, HEADS)))
def test_writers_are_spread_over_the_replicas_of_a_head(p: int, d: int, h: int) -> None:
    pre, dec = Group("prefill", p), Group("decode", d)
    m = rank_map(pre, dec, h)
    per_head: dict[int, Counter[int]] = {}
    for s in m.slices:
        for i in range(s.heads):
            head = held(pre, h, s.prefill)[0] + s.src[0] + i
            per_head.setdefault(head, Counter())[s.prefill] += 1
    for head, writers in per_head.items():
        replicas = [r for r in range(p) if held(pre, h, r)[0] <= head < held(pre, h, r)[1]]
        counts = [writers.get(r, 0) for r in replicas]
        assert max(counts) - min(counts) <= 1, f"head {head}: writes per replica {counts}"


@pytest.mark.parametrize(("p", "d"), list(itertools.product(SIZES, SIZES)))
def test_a_replicated_cache_gets_one_writer_per_decode_rank_spread_over_prefill(p: int, d: int) -> None:
    m = rank_map(Group("prefill", p), Group("decode", d), 16, replicated=True)
    assert [m.writers_of(r) for r in range(d)] == [(r % p,) for r in range(d)]
    load = Counter(s.prefill for s in m.slices)
    assert max(load.values()) <= math.ceil(d / p)
    assert all(s.src == s.dst == (0, 1) for s in m.slices)


@pytest.mark.parametrize(
    ("p", "d", "h", "words"),
    [
        (4, 2, 6, ["prefill group 'prefill' has 4 ranks", "6 KV heads", "6 / 4 is not whole"]),
        (2, 4, 6, ["decode group 'decode' has 4 ranks", "6 KV heads"]),
        (6, 2, 4, ["prefill group 'prefill' has 6 ranks", "more than the model's 4 KV heads", "multiple"]),
        (2, 12, 8, ["decode group 'decode' has 12 ranks", "8 KV heads"]),
    ],
)
def test_a_map_that_cannot_work_is_refused_naming_the_group_and_the_numbers(
    p: int, d: int, h: int, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        rank_map(Group("prefill", p), Group("decode", d), h)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_token_major_slice_is_one_piece_per_token_and_a_whole_block_is_no_slice() -> None:
    """Tokens outermost inside a block (NHD): a run of heads is a piece of every token; where a
    rank writes every head of the block on both sides, nothing is sliced."""
    from kvxferd.core.rankmap import Cut, cut_of

    m = rank_map(Group("p", 2), Group("d", 4), 8)  # 4 heads per prefill rank, 2 per decode rank
    head, tokens = 16 * 64 * 2, 16  # bytes of one head in a block of 16 tokens
    (first, second) = m.writes_of(1)
    row = head // tokens
    assert cut_of(second, head, 4 * head, 2 * head, tokens) == Cut(2 * row, 0, 2 * row, tokens, 4 * row, 2 * row)
    assert cut_of(first, head, 4 * head, 2 * head, tokens) == Cut(0, 0, 2 * row, tokens, 4 * row, 2 * row)
    (same,) = rank_map(Group("p", 2), Group("d", 2), 8).writes_of(1)
    assert cut_of(same, head, 4 * head, 4 * head, tokens) is None
    assert cut_of(same, head, 4 * head, 4 * head) is None
