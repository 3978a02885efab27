"""The barrier service's journal (kvxferd.runtime.journal): verdicts written, read back by age,
bounded by rotation, and a file that is not ours, or is torn, never taken for more than it is."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from kvxferd.protocol import Arrive, Digest, Expired, Release, Status, Withdraw
from kvxferd.runtime.journal import Journal

D = Digest(4, 2, 1024, "aa")


def release(n: int) -> Release:
    return Release("g", f"r{n}", 0, D, "decode")


def test_verdicts_come_back_with_their_age_and_the_old_ones_do_not(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal", keep=100)
    j.open()
    expired = Expired("g", "x", 1, (1,), 3.0, Status.FAILED, "rank 1 stopped", "decode")
    j.append([release(1)], now=1000.0)
    j.append([release(2), expired], now=1020.0)
    j.close()
    back = Journal(tmp_path / "journal", keep=100).load(max_age_s=30.0, now=1040.0)
    assert back == [(release(2), 20.0), (expired, 20.0)]  # release(1) is 40 s old: gone
    assert (os.stat(tmp_path / "journal").st_mode & 0o777) == 0o600


def test_words_come_back_after_every_verdict_each_oldest_first(tmp_path: Path) -> None:
    """A restarted service recalls the verdicts before the words, so the word of a key that a
    later verdict ended never reopens it."""
    j = Journal(tmp_path / "journal", keep=100)
    j.open()
    arrive = Arrive("g", "r1", 0, 1, D, peer="decode")
    withdraw = Withdraw("g", "r3", 0, 0, Status.FAILED, "exiting", True, "decode")
    j.append([arrive], now=1000.0)
    j.append([release(1), withdraw], now=1001.0)
    j.close()
    back = Journal(tmp_path / "journal", keep=100).load(max_age_s=30.0, now=1010.0)
    assert back == [(release(1), 9.0), (arrive, 10.0), (withdraw, 9.0)]


def test_rotation_bounds_what_is_kept_and_read_back(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal", keep=3)
    j.open()
    for n in range(10):
        j.append([release(n)], now=1000.0 + n)
    j.close()
    back = [v.key for v, _ in Journal(tmp_path / "journal", keep=3).load(max_age_s=60.0, now=1010.0)]
    assert back == ["r6", "r7", "r8", "r9"], "the previous file and the current one, nothing older"
    j2 = Journal(tmp_path / "journal", keep=3)
    j2.open()  # goes on counting what the current file holds
    assert j2.written == 1
    j2.close()


def test_a_restart_decodes_only_the_window_it_reads_back(tmp_path: Path) -> None:
    """Entries older than the window are counted (the file's bound) but never decoded: a restart
    under a high request rate reads back seconds of entries, not a whole file."""
    path = tmp_path / "journal"
    old = msgpack.packb([900.0, b"\x93not a frame"], use_bin_type=True)  # would not decode
    path.write_bytes(old)
    os.chmod(path, 0o600)
    j = Journal(path, keep=100)
    j.open()
    assert j.written == 1
    j.append([release(1)], now=1000.0)
    j.close()
    reader = Journal(path, keep=100)
    assert [v.key for v, _ in reader.load(max_age_s=60.0, now=1001.0)] == ["r1"]
    assert reader.unreadable == 0


def test_a_torn_last_entry_ends_the_read_and_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    j = Journal(path, keep=100)
    j.open()
    j.append([release(1), release(2)], now=1000.0)
    j.close()
    data = path.read_bytes()
    path.write_bytes(data + data[: len(data) // 3])  # a write cut short when the process died
    reader = Journal(path, keep=100)
    back = [v.key for v, _ in reader.load(max_age_s=60.0, now=1001.0)]
    assert back == ["r1", "r2"]
    path.write_bytes(data + b"\xc1garbage")
    reader = Journal(path, keep=100)
    assert [v.key for v, _ in reader.load(max_age_s=60.0, now=1001.0)] == ["r1", "r2"]
    assert reader.unreadable == 1


def test_a_link_in_its_place_is_neither_read_nor_written(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    path = tmp_path / "journal"
    path.symlink_to(target)
    j = Journal(path, keep=10)
    assert j.load(max_age_s=60.0) == []
    with pytest.raises(OSError, match="link"):
        j.open()
