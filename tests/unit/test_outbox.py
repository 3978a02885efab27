"""Messages dropped while their connection stays up are tried again within a bound (issue 23, item 11)."""

from __future__ import annotations

from kvxferd.runtime.outbox import Outbox


def test_a_message_that_could_not_be_sent_is_tried_again_until_it_goes_or_its_time_is_up() -> None:
    box: Outbox[str, str] = Outbox(limit=3, retry_s=0.5, keep_s=2.0)
    up = {b"a": False, b"b": False}
    sent: list[str] = []

    def send(dest: bytes | None, msg: str) -> bool:
        if dest is not None and up[dest]:
            sent.append(msg)
            return True
        return False

    assert box.hold("r1", b"a", "result 1", 0.0) == [] and box.hold("r2", b"b", "result 2", 0.1) == []
    assert box.next_deadline() == 0.5 and box.retry(0.4, send) == []
    assert box.retry(0.5, send) == [] and len(box) == 2  # neither peer takes anything yet
    up[b"a"] = True
    assert box.retry(1.0, send) == [] and sent == ["result 1"] and box.delivered == 1
    assert box.retry(2.2, send) == ["result 2"]  # 2 s after it was first refused: given up, said
    assert len(box) == 0 and box.next_deadline() is None and box.given_up == 1


def test_the_outbox_is_bounded_and_says_what_it_pushed_out() -> None:
    box: Outbox[int, str] = Outbox(limit=2, retry_s=1.0, keep_s=10.0)
    box.hold(1, None, "one", 0.0)
    box.hold(2, None, "two", 0.0)
    assert box.hold(3, None, "three", 0.0) == ["one"] and len(box) == 2 and box.given_up == 1
