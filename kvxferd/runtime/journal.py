"""The barrier service's journal: its words and verdicts of late, kept across a restart.

Theory of operation: the barrier service remembers every final verdict for
``remember_s`` so that a rank asking late (a straggler, a rank that
restarted, a word said again after a restart) hears the same ending, and it
holds every open round until it ends. Memory alone loses both on a restart: a
rank's new process whose cache_info comes after the service restarted would
open the key anew and decide it alone, and a round whose ranks all died or
exited around the restart would never end, so nobody would tell their decode
ranks. So the service appends each word of a request's key it takes and each
verdict it decides to a file before it sends anything they caused (one
``write`` per message handled, no fsync: it survives the process, which is
the fault it is for, not the host), and a service that starts reads back what
is younger than ``remember_s`` (``BarrierState.recall``: verdicts first, then
the words of keys no verdict ended).

Bounds: a file holds at most ``keep`` entries; then it becomes the previous
file (the one before is dropped) and a new one starts, so at most ``2 x keep``
entries are ever read back, each a bounded protocol frame. The file is ours
or ignored: a regular file of this uid, opened without following links; an
entry that does not decode (a torn last write, another version) ends the read
of that file, and is counted.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

from kvxferd.errors import ProtocolError
from kvxferd.protocol import Admit, Arrive, Diverged, Expired, Release, Withdraw, decode, encode

log = logging.getLogger(__name__)

Entry = Admit | Arrive | Withdraw | Release | Diverged | Expired
ENTRY_TYPES = (Admit, Arrive, Withdraw, Release, Diverged, Expired)

#: the largest journal entry read back (a verdict frame is far smaller: reasons are clipped)
MAX_ENTRY = 64 * 1024


class Journal:
    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.previous = path.with_name(path.name + ".1")
        self.keep = keep
        self.written = 0  # entries in the current file
        self.unreadable = 0  # entries that did not decode when read back
        self._fd: int | None = None

    def load(self, max_age_s: float, now: float | None = None) -> list[tuple[Entry, float]]:
        """Every entry of the files younger than ``max_age_s``, with its age: the verdicts first,
        then the words, each oldest first (the order ``BarrierState.recall`` takes them in)."""
        now = time.time() if now is None else now
        found: list[tuple[Entry, float]] = []
        for path in (self.previous, self.path):
            for when, entry in self._read(path, now - max_age_s)[1]:
                age = now - when
                if 0 <= age < max_age_s:
                    found.append((entry, age))
        found.sort(key=lambda e: not isinstance(e[0], (Release, Diverged, Expired)))  # (stable)
        return found

    def open(self) -> None:
        """Start appending (the current file goes on from where it is)."""
        self.written = self._read(self.path, float("inf"))[0]  # (counted, none decoded)
        self._fd = _open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def append(
        self, entries: list[Entry], now: float | None = None, encoded: Callable[[Entry], bytes] = encode
    ) -> None:
        """Write ``entries`` (one write call) before anything they caused is sent. ``encoded``: each
        entry's frame (the caller's, when it sends the same verdicts next)."""
        if self._fd is None or not entries:
            return
        now = time.time() if now is None else now
        data = b"".join(msgpack.packb([now, encoded(v)], use_bin_type=True) for v in entries)
        try:
            os.write(self._fd, data)
        except OSError as exc:  # a full disk must not stop the service: it only forgets more on a restart
            log.error("barrier journal %s: %s; nothing is kept across a restart meanwhile", self.path, exc)
            return
        self.written += len(entries)
        if self.written >= self.keep:
            self._rotate()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.previous)
        self._fd = _open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
        self.written = 0

    def _read(self, path: Path, newer_than: float) -> tuple[int, list[tuple[float, Entry]]]:
        """How many entries ``path`` holds, and those written at ``newer_than`` or later, decoded
        (the older ones are only counted: a restart reads back a window, not the whole file)."""
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0, []
        except OSError as exc:
            log.error("barrier journal %s not read: %s", path, exc)
            return 0, []
        count, entries = 0, []
        with os.fdopen(fd, "rb") as f:
            unpacker = msgpack.Unpacker(f, max_buffer_size=MAX_ENTRY, max_bin_len=MAX_ENTRY, use_list=True)
            try:
                for item in unpacker:
                    when, frame = item
                    if not isinstance(when, float) or not isinstance(frame, bytes):
                        raise ProtocolError(f"not a journal entry: {type(when).__name__}, {type(frame).__name__}")
                    count += 1
                    if count > self.keep:  # never more than one file's worth
                        raise ProtocolError(f"more than {self.keep} entries")
                    if when < newer_than:
                        continue
                    entry = decode(frame)
                    if not isinstance(entry, ENTRY_TYPES):
                        raise ProtocolError(f"not a word or a verdict: {type(entry).__name__}")
                    entries.append((when, entry))
            except (ProtocolError, ValueError, TypeError, msgpack.UnpackException) as exc:
                self.unreadable += 1
                log.warning("barrier journal %s: read stopped after %d entries: %s", path, count, exc)
        return count, entries


def _open(path: Path, flags: int) -> int:
    """``path`` opened without following a link; refused unless it is a regular file of ours."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"{path} is not a regular file of uid {os.geteuid()}")
    return fd
