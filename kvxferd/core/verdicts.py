"""How a round at the barrier ends: one status and one reason, the same for every rank.

Theory of operation: every rank says one word per round (admit with its
terms, arrive with its digest, or withdraw with a status and reason). These
pure functions turn the words of a round into the round's ending, or ``None``
when the words agree and the round succeeds. The status follows one fixed
precedence:

1. a rank withdrew as ``failed`` (it refused, failed or timed out): ``failed``;
2. else a rank withdrew as ``aborted``: ``aborted``;
3. else the words disagree, or some rank never spoke: ``failed``.

Rule 1 comes first for a reason: a rank that *refused* a cache_info keeps no
state and reports ``failed`` to its engine and decode peer at once, before any
verdict. Because a failed withdrawal always wins, the verdict every other rank
reports later is ``failed`` too. Reasons name the ranks and, for a divergence
at admission, the fields that differ. Every reason is clipped to the protocol's
text limit, so a long reason from a rank cannot make a verdict unsendable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvxferd.core.request import Ending
from kvxferd.protocol import RankView, Status, Terms
from kvxferd.protocol.fields import clip


def _ranks(ranks: Sequence[int]) -> str:
    return f"ranks [{', '.join(map(str, ranks))}]" if len(ranks) != 1 else f"rank {ranks[0]}"


def withdrawn(views: Sequence[RankView]) -> Ending | None:
    """The ending that withdrawals impose, if any rank withdrew."""
    failed = [v for v in views if v.status is Status.FAILED]
    if failed:
        return Ending(Status.FAILED, clip("; ".join(f"rank {v.rank} failed: {v.reason}" for v in failed)))
    aborted = [v for v in views if v.status is Status.ABORTED]
    if aborted:
        return Ending(Status.ABORTED, clip(f"aborted: {aborted[0].reason}"))
    return None


def _grouped(views: Sequence[RankView], value: Callable[[RankView], str]) -> str:
    by_value: dict[str, list[int]] = {}
    for v in views:
        by_value.setdefault(value(v), []).append(v.rank)
    return "; ".join(f"{_ranks(ranks)}: {val}" for val, ranks in by_value.items())


def _field(name: str) -> Callable[[RankView], str]:
    return lambda v: str(getattr(v.terms, name))


def admission(views: Sequence[RankView]) -> Ending | None:
    """Every rank spoke in the admission round: None if all admitted with equal terms."""
    ending = withdrawn(views)
    if ending is not None:
        return ending
    terms = [v.terms for v in views]
    if all(t == terms[0] for t in terms):
        return None
    differ = []
    for name in Terms.FIELDS:
        if len({getattr(t, name) for t in terms}) > 1:
            differ.append(f"{name} ({_grouped(views, _field(name))})")
    return Ending(Status.FAILED, clip(f"ranks disagree on the cache_info: {', '.join(differ)}; nothing was written"))


def completion(views: Sequence[RankView]) -> Ending | None:
    """Every rank spoke in the completion round: None if all arrived with equal digests."""
    ending = withdrawn(views)
    if ending is not None:
        return ending
    digests = [v.digest for v in views]
    if all(d == digests[0] for d in digests):
        return None
    detail = _grouped(views, lambda v: v.digest.describe() if v.digest is not None else "?")
    return Ending(Status.FAILED, clip(f"ranks did not agree on what they wrote: {detail}"))


def expiry(
    views: Sequence[RankView],
    missing: Sequence[int],
    group: str,
    round_name: str,
    waited_s: float,
    stopped: Sequence[int] = (),
    how: str = "stopped serving (no heartbeat) before reporting",
) -> Ending:
    """The round's deadline passed with ``missing`` ranks silent; or, with ``stopped``, those of
    them are gone (``how``), so the round ends without waiting longer."""
    if stopped:
        silent = f"{_ranks(stopped)} of group {group} {how} ({round_name})"
    else:
        silent = f"{_ranks(missing)} of group {group} did not report within {waited_s:.3g}s ({round_name})"
    ending = withdrawn(views)
    if ending is None:
        return Ending(Status.FAILED, clip(silent))
    return Ending(ending.status, clip(f"{ending.reason} ({silent})"))
