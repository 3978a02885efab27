"""The vLLM connector's decisions (kvxferd.integrations.vllm.plan), without vLLM: every transfer
ends once, on both sides, whatever comes first (prompt, offers, abort, deadline)."""

from __future__ import annotations

import pytest

from kvxferd.errors import LocalProtocolError
from kvxferd.integrations.vllm.plan import Decline, PrefillPlan, Receiver, SendAbort, Submit, serving_problem
from kvxferd.protocol import BlockOffer, CacheLayout, SlotChunk, decode, encode


def plan(world: int = 1, slots: int = 4) -> PrefillPlan:
    return PrefillPlan(block_tokens=32, decode_group="decode", decode_world=world, max_slots=slots, offer_s=10.0)


def offer(xfer: str, rank: int = 0, tokens: int = 70, blocks: tuple[int, ...] = (40, 41, 42)) -> BlockOffer:
    return BlockOffer(xfer, "decode", rank, tokens, blocks)


def run_prompt(p: PrefillPlan, req: str, xfer: str, tokens: int = 70, chunk: int = 64) -> list[int]:
    """Schedule ``req``'s prompt in chunks; return the step ids it ran in."""
    p.add(req, xfer, tokens)
    steps, done = [], 0
    while done < tokens:
        sp = p.step([(req, done, chunk)])
        assert sp is not None
        steps.append(sp.step)
        done += min(chunk, tokens - done)
    return steps


@pytest.mark.parametrize("offer_first", [True, False])
def test_the_cache_info_goes_once_prompt_and_offer_are_both_in_whichever_came_first(offer_first: bool) -> None:
    p = plan()
    effects = p.offer(offer("x1"), 0.0) if offer_first else []
    steps = run_prompt(p, "r1", "x1")
    assert steps == [1, 2]
    delay, more = p.finished("r1", True, [5, 6, 7, 8], 1.0)
    effects += more
    if not offer_first:
        assert effects == []
        effects = p.offer(offer("x1"), 2.0)
    assert delay is True
    [sub] = effects
    assert isinstance(sub, Submit)
    info = sub.info
    assert (info.request_id, info.step, info.num_tokens) == ("x1", 1, 70)
    assert info.src_blocks == (5, 6, 7) and info.dst_blocks == (40, 41, 42)
    assert p.take_freed() == [] and p.busy
    p.decided("x1", 0)
    assert p.take_freed() == ["r1"] and not p.busy
    assert p.sizes()["slots_free"] == 4


def test_chunks_of_one_prompt_keep_its_slot_and_first_step() -> None:
    p = plan()
    p.add("a", "xa", 100)
    p.add("b", "xb", 40)
    s1 = p.step([("a", 0, 64), ("b", 0, 40)])
    s2 = p.step([("a", 64, 64)])
    assert s1 is not None and s2 is not None
    assert s1.chunks == (SlotChunk(0, 0, 64, 1), SlotChunk(1, 0, 40, 1))
    assert s2.chunks == (SlotChunk(0, 64, 36, 1),)
    assert p.step([("a", 100, 1)]) is None  # generation after the prompt is not signalled


def test_an_aborted_prompt_aborts_at_kvxferd_and_declines_decode_now_and_later() -> None:
    p = plan(world=2)
    p.offer(offer("x", rank=0), 0.0)
    p.add("r", "x", 70)
    p.step([("r", 0, 64)])
    delay, effects = p.finished("r", False, [1, 2, 3], 1.0)
    assert delay is False
    assert effects[0] == SendAbort("x", 0, effects[0].reason)
    assert isinstance(effects[1], Decline) and effects[1].ranks == (0,)
    late = p.offer(offer("x", rank=1), 2.0)
    assert len(late) == 1 and isinstance(late[0], Decline) and late[0].ranks == (1,)
    assert p.sizes() == {"prompts": 0, "submitted": 0, "early_offers": 0, "slots_free": 4}


def test_a_prompt_whose_offers_never_come_is_freed_at_its_deadline() -> None:
    p = plan()
    run_prompt(p, "r", "x")
    assert p.finished("r", True, [1, 2, 3], 0.0)[0] is True
    assert p.next_deadline() == 10.0
    assert p.tick(9.9) == [] and p.take_freed() == []
    [abort] = p.tick(10.0)
    assert isinstance(abort, SendAbort) and "no decode offer" in abort.reason
    assert p.take_freed() == ["r"]
    [decline] = p.offer(offer("x"), 11.0)
    assert isinstance(decline, Decline)


def test_offers_that_do_not_fit_the_prompt_end_it_on_both_sides() -> None:
    p = plan()
    run_prompt(p, "r", "x")
    p.finished("r", True, [1, 2, 3], 0.0)
    effects = p.offer(offer("x", tokens=71), 0.0)
    assert [type(e) for e in effects] == [SendAbort, Decline]
    assert p.take_freed() == ["r"]


def test_early_offers_without_a_prompt_are_declined_at_their_deadline_and_offers_from_elsewhere_at_once() -> None:
    p = plan()
    assert p.offer(offer("lonely"), 0.0) == []
    [d] = p.tick(10.0)
    assert isinstance(d, Decline) and d.xfer == "lonely"
    [d] = p.offer(BlockOffer("y", "other", 0, 10, (1,)), 0.0)
    assert isinstance(d, Decline) and "not 'other'" in d.reason
    [d] = p.offer(offer("y", rank=3), 0.0)
    assert isinstance(d, Decline)


def test_a_reused_transfer_id_and_a_full_slot_table_are_refused_not_mixed_up() -> None:
    p = plan(slots=1)
    run_prompt(p, "r1", "x")
    p.add("r2", "x", 70)  # the same transfer id again
    assert p.step([("r2", 0, 64)]) is None
    assert p.finished("r2", True, [1, 2, 3], 0.0) == (False, [])
    p.add("r3", "z", 70)
    assert p.step([("r3", 0, 64)]) is None  # the only slot is r1's
    delay, _ = p.finished("r3", True, [1, 2, 3], 0.0)
    assert delay is False


def test_a_preempted_prompt_starts_a_new_instance() -> None:
    p = plan()
    p.add("r", "x", 70)
    p.step([("r", 0, 64)])
    [abort] = p.preempted("r")
    assert abort == SendAbort("x", 0, abort.reason)
    run = p.step([("r", 0, 64)])
    assert run is not None and run.chunks[0].start_step == 2
    p.step([("r", 64, 64)])
    p.finished("r", True, [1, 2, 3], 0.0)
    [sub] = p.offer(offer("x"), 0.0)
    assert isinstance(sub, Submit) and sub.info.instance == 1 and sub.info.step == 2


def test_the_receiver_ends_each_transfer_once() -> None:
    r = Receiver(wait_s=5.0)
    r.expect("a", "ra", 0.0)
    r.expect("b", "rb", 0.0)
    r.expect("c", "rc", 0.0)
    r.ready("a")
    r.ready("a")
    r.failed("b", "declined")
    r.tick(5.0)
    assert r.take() == ({"ra"}, {"rb": "declined", "rc": "no word from kvxferd within 5s"})
    assert r.take() == (set(), {}) and r.waiting() == 0


def test_block_offers_and_packed_layouts_are_checked_on_the_wire() -> None:
    assert decode(encode(offer("x"))) == offer("x")
    with pytest.raises(LocalProtocolError):
        BlockOffer("x", "decode", 0, 10, (1, 1))
    with pytest.raises(LocalProtocolError):
        BlockOffer("x", "decode", 0, 10, ())
    with pytest.raises(LocalProtocolError):
        CacheLayout(4, 8, 64, planes=3)
    assert CacheLayout(4, 8, 64).planes == 2


def test_a_submitted_prompt_that_kvxferd_never_decides_is_aborted_and_freed_at_its_deadline() -> None:
    """By ``decide_s`` after its CacheInfo went, every live kvxferd rank has ended the request by its
    own deadlines: a prompt still not decided then (its results lost, its daemons gone unseen) is
    aborted at kvxferd and its source blocks are freed, never pinned for good."""
    p = PrefillPlan(block_tokens=32, decode_group="decode", decode_world=1, max_slots=4, offer_s=10.0, decide_s=50.0)
    run_prompt(p, "r", "x")
    p.finished("r", True, [1, 2, 3], 0.0)
    [sub] = p.offer(offer("x"), 1.0)
    assert isinstance(sub, Submit) and p.next_deadline() == 51.0
    assert p.tick(50.9) == [] and p.take_freed() == [] and p.busy
    [abort] = p.tick(51.0)
    assert abort == SendAbort("x", 0, abort.reason) and "kvxferd did not decide" in abort.reason
    assert p.take_freed() == ["r"] and not p.busy
    p.decided("x", 0)  # a decision that comes after all is harmless
    assert p.take_freed() == [] and p.sizes() == {"prompts": 0, "submitted": 0, "early_offers": 0, "slots_free": 4}


@pytest.mark.parametrize(
    ("tp", "pp", "groups", "named"),
    [
        (2, 1, 1, "tensor_parallel_size 2 != world_size 1 of kvxferd group 'prefill'"),
        (1, 2, 1, "pipeline_parallel_size 2"),
        (1, 1, 2, "2 KV-cache groups"),
    ],
)
def test_a_vllm_shape_the_connector_cannot_serve_is_refused_naming_the_setting(
    tp: int, pp: int, groups: int, named: str
) -> None:
    """Issue 24, item 5 (a first part): checked when the connector starts, never found later."""
    why = serving_problem("prefill", 1, tensor_parallel=tp, pipeline_parallel=pp, kv_cache_groups=groups)
    assert why is not None and named in why
    assert serving_problem("prefill", 2, tensor_parallel=2, pipeline_parallel=1, kv_cache_groups=1) is None
