"""A request's two state machines, tested as tables: every row, every refusal, every deadline.

In the manner of h11's test of its state table: each (state, event) the tables
list moves to its target; each one they do not list raises StateError naming
the request and its states, and changes nothing; each pair of states says
what it waits for and arms the timer the WAITS table names, counted from the
moment the table says.
"""

from __future__ import annotations

import itertools

import pytest

from kvxferd.core.lifecycle import Lifecycle
from kvxferd.core.request import Request
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import (
    AGREEMENT,
    DATA,
    END,
    WAITS,
    Agreement,
    AgreementEvent,
    Data,
    DataEvent,
    Timer,
    allows,
    waits,
    writing,
)
from kvxferd.errors import StateError
from kvxferd.protocol import CacheInfo

SETTINGS = RankSettings(
    "prefill", 0, 2, 4, 64, 16, 1024, pending_timeout_s=5.0, progress_timeout_s=7.0, verdict_timeout_s=11.0
)
CREATED = 100.0
NOW = 103.0


def _entered() -> tuple[Lifecycle, Request]:
    life = Lifecycle(SETTINGS)
    req = life.enter(CacheInfo("r", 0, 1, 16, (1,), (2,), "d"), CREATED, None)
    return life, req


def _placed(data: Data, agreement: Agreement) -> tuple[Lifecycle, Request]:
    life, req = _entered()
    req.data, req.agreement = data, agreement
    return life, req


DATA_ROWS = [(state, event) for state in Data for event in DataEvent]
AGREEMENT_ROWS = [(state, event) for state in Agreement for event in AgreementEvent]


@pytest.mark.parametrize(("state", "event"), DATA_ROWS, ids=lambda v: v.value)
def test_each_data_row_moves_to_its_target_and_each_missing_one_refuses(state: Data, event: DataEvent) -> None:
    life, req = _placed(state, Agreement.ADMITTED)
    target = DATA[state].get(event)
    assert allows(req, event) == (target is not None)
    if target is None:
        with pytest.raises(StateError, match=rf"request r instance 0 on prefill rank 0: cannot {event.value} while"):
            life.move(req, NOW, data=event)
        assert (req.data, req.agreement) == (state, Agreement.ADMITTED), "a refused event changes nothing"
    else:
        life.move(req, NOW, data=event)
        assert req.data is target
        assert req.writing is writing(req), "every move keeps the request's writing flag"


@pytest.mark.parametrize(("state", "event"), AGREEMENT_ROWS, ids=lambda v: v.value)
def test_each_agreement_row_moves_to_its_target_and_each_missing_one_refuses(
    state: Agreement, event: AgreementEvent
) -> None:
    life, req = _placed(Data.QUIET, state)
    target = AGREEMENT[state].get(event)
    assert allows(req, event) == (target is not None)
    if target is None:
        with pytest.raises(StateError, match=f"cannot {event.value} while {state.value}"):
            life.move(req, NOW, agreement=event)
        assert req.agreement is state
    else:
        life.move(req, NOW, agreement=event)
        assert req.agreement is target
        assert req.writing is writing(req), "every move keeps the request's writing flag"


def test_a_move_with_both_events_refuses_as_a_whole() -> None:
    """The data event is legal, the agreement event is not: neither machine moves."""
    life, req = _placed(Data.ACTIVE, Agreement.ARRIVED)
    with pytest.raises(StateError):
        life.move(req, NOW, data=DataEvent.HALT, agreement=AgreementEvent.WITHDRAW)
    assert (req.data, req.agreement) == (Data.ACTIVE, Agreement.ARRIVED)


def test_the_tables_have_no_dead_ends_but_the_end() -> None:
    """From every state some event leads on, except QUIET and DECIDED, which together end a
    request; and the end is reachable from the start along the tables."""
    assert [s for s in Data if not DATA[s]] == [Data.QUIET]
    assert [s for s in Agreement if not AGREEMENT[s]] == [Agreement.DECIDED]
    assert END == (Data.QUIET, Agreement.DECIDED)


#: when each timer falls due, for a request created at CREATED and moved at NOW
DUE = {
    Timer.SIGNAL: CREATED + 5.0,
    Timer.ADMISSION: CREATED + 11.0,
    Timer.PROGRESS: NOW + 7.0,
    Timer.DRAIN: NOW + 7.0,
    Timer.VERDICT: NOW + 11.0,
}


@pytest.mark.parametrize("pair", list(itertools.product(Data, Agreement)), ids=lambda p: f"{p[0].value}-{p[1].value}")
def test_each_pair_of_states_arms_the_timer_the_waits_table_names(pair: tuple[Data, Agreement]) -> None:
    life, req = _entered()
    req.data, req.agreement = pair
    req.timer = None
    life.move(req, NOW)  # no event: arm what the pair waits on
    wait = WAITS.get(pair)
    assert waits(req) == wait
    if wait is None:  # a passing pair: nothing may wait in it
        assert req.timer is None and life.next_deadline() is None
    else:
        assert req.timer is wait.timer
        assert life.next_deadline() == DUE[wait.timer]
        assert wait.name and wait.words


def test_a_timer_keeps_running_while_the_pair_keeps_it_and_progress_starts_it_again() -> None:
    life, req = _entered()
    assert life.next_deadline() == CREATED + 5.0  # waiting for the signal, from the cache_info
    life.move(req, 102.0, agreement=AgreementEvent.ADMIT)
    assert life.next_deadline() == CREATED + 5.0, "admission does not restart the signal's deadline"
    life.move(req, 103.0, data=DataEvent.RECOVER)
    assert (req.timer, life.next_deadline()) == (Timer.PROGRESS, 110.0)
    life.move(req, 104.0, data=DataEvent.PROGRESS)
    assert life.next_deadline() == 111.0
    life.move(req, 105.0, data=DataEvent.DRAIN)
    life.move(req, 106.0, agreement=AgreementEvent.DECIDE)
    assert (req.timer, life.next_deadline()) == (Timer.DRAIN, 112.0), "a verdict does not restart the drain"


def test_a_word_said_again_to_a_restarted_service_restarts_the_wait_for_its_verdict() -> None:
    """The new service opens the round afresh, with its own timeout: the rank waits a whole
    verdict deadline from the word said again, not from the first one."""
    life, req = _placed(Data.ACTIVE, Agreement.ADMITTED)
    life.move(req, 103.0, data=DataEvent.FINISH, agreement=AgreementEvent.ARRIVE)
    assert (req.timer, life.next_deadline()) == (Timer.VERDICT, 114.0)
    life.move(req, 110.0, agreement=AgreementEvent.REANNOUNCE)
    assert life.next_deadline() == 121.0


def test_only_the_end_pair_may_end_and_ending_forgets_the_deadline() -> None:
    life, req = _entered()
    with pytest.raises(StateError, match="cannot end"):
        life.end(req)
    assert life.requests
    life.move(req, NOW, data=DataEvent.HALT, agreement=AgreementEvent.WITHDRAW)
    life.move(req, NOW, agreement=AgreementEvent.DECIDE)
    life.end(req)
    assert not life.requests and life.next_deadline() is None and life.armed == 0


@pytest.mark.parametrize("pair", list(itertools.product(Data, Agreement)), ids=lambda p: f"{p[0].value}-{p[1].value}")
def test_abandon_reaches_the_end_from_any_pair(pair: tuple[Data, Agreement]) -> None:
    life, req = _placed(*pair)
    life.abandon(req, NOW)
    assert (req.data, req.agreement) == END
    life.end(req)
    assert not life.requests


def test_only_an_admitted_job_writes() -> None:
    assert [pair for pair in itertools.product(Data, Agreement) if writing(_placed(*pair)[1])] == [
        (Data.ACTIVE, Agreement.ADMITTED)
    ]
