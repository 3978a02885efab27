"""How a scheduler reads one ending from its ranks' results (kvxferd.client.PrefillOutcome)."""

from __future__ import annotations

from kvxferd.client import PrefillOutcome
from kvxferd.protocol import Status, TransferResult


def outcome(*results: TransferResult) -> PrefillOutcome:
    return PrefillOutcome("r", 0, 2, {res.rank: res for res in results})


def test_the_group_ending_is_read_from_the_results_without_a_code() -> None:
    ok = TransferResult("r", Status.OK, "", 0)
    assert (outcome(ok).status, outcome(ok).reason) == (Status.OK, "")
    # rank 1's decode engine was told a failure after the group released the request
    stale = TransferResult("r", Status.FAILED, "registration 'a' is gone", 1, code="not_registered")
    both = outcome(ok, stale)
    assert not both.ok and both.status is Status.FAILED and both.reason == stale.reason
    # a refusal (a code) after the group aborted without the refusing rank: the group's word wins
    aborted = TransferResult("r", Status.ABORTED, "aborted: client cancelled", 0)
    refused = TransferResult("r", Status.FAILED, "table full", 1, code="table_full")
    mixed = outcome(refused, aborted)
    assert mixed.status is Status.ABORTED and mixed.reason == aborted.reason
    assert outcome().status is None and outcome().reason == ""
