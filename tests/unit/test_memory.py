"""The one bounded memory type (kvxferd.core.memory), with a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxferd.core.memory import Memory


def test_the_count_bound_pushes_the_oldest_out_and_counts_it() -> None:
    m: Memory[str, int] = Memory(limit=2)
    assert m.put("a", 1) is None and m.put("b", 2) is None
    assert m.put("c", 3) == ("a", 1)
    assert m.keys() == ["b", "c"] and m.evicted == 1 and m.full
    assert m.put("b", 20) is None, "putting a key again is no new entry"
    assert m.keys() == ["c", "b"], "and it moves it to the young end"
    assert m.put("d", 4) == ("c", 3)


def test_the_age_bound_forgets_at_whole_granules_and_says_when() -> None:
    m: Memory[str, str] = Memory(limit=10, ttl_s=5.0)
    m.put("a", "x", now=0.2)
    m.put("b", "y", now=1.5)
    assert m.next_deadline() == 6.0  # 0.2 + 5 rounded up to a whole second
    assert m.expire(5.99) == [] and len(m) == 2
    assert m.expire(6.0) == [("a", "x")] and m.keys() == ["b"] and m.expired == 1
    assert m.next_deadline() == 7.0
    m.put("b", "y", now=4.0)  # remembered again: from now
    assert m.expire(7.0) == [] and m.next_deadline() == 9.0


def test_without_an_age_bound_nothing_expires() -> None:
    m: Memory[int, int] = Memory(limit=3)
    m.put(1, 1)
    assert m.next_deadline() is None and m.expire(1e12) == [] and 1 in m


def test_get_pop_and_oldest_do_not_reorder() -> None:
    m: Memory[str, int] = Memory(limit=3)
    for i, k in enumerate("abc"):
        m.put(k, i)
    assert m.get("a") == 0 and m.oldest() == ("a", 0)
    assert m.pop("b") == 1 and m.pop("b") is None and m.get("zz") is None
    assert m.items() == [("a", 0), ("c", 2)] and m.values() == [0, 2]


def test_a_memory_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Memory(limit=0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(0, 9), st.floats(0.0, 3.0, allow_nan=False)), max_size=60),
)
def test_any_sequence_stays_within_both_bounds(limit: int, puts: list[tuple[int, float]]) -> None:
    m: Memory[int, float] = Memory(limit=limit, ttl_s=2.0, granularity_s=0.5)
    now = 0.0
    for key, advance in puts:
        now += advance
        m.expire(now)
        m.put(key, now, now)
        assert len(m) <= limit
        # nothing older than ttl (plus one granule) survives an expiry
        m.expire(now)
        assert all(now - since < 2.0 + 0.5 for since in m.values())
