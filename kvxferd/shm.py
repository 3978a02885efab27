"""POSIX shared-memory segments: created by an engine, mapped by daemons.

We open ``/dev/shm/<name>`` directly instead of using
``multiprocessing.shared_memory``: on Python 3.11 the latter registers every
segment it *attaches* to with a resource tracker that unlinks it when the
attaching process exits, which would destroy an engine's KV cache the first
time a daemon restarted. Here the creator owns the segment (``unlink``) and
everyone else only maps it.

Segments are context managers; ``close`` unmaps, ``unlink`` removes the name.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
from pathlib import Path
from types import TracebackType

from kvxferd.errors import TransportError

SHM_DIR = Path("/dev/shm")
# Fault every page in when mapping: a cache is mapped once and then written for its whole life,
# and first-touch faults otherwise land on the first requests (measured: ~3x slower copies).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# a plain file name: no path parts, no leading dot (so never "." or "..")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")
# never follow a link, never block on a FIFO or a device, never leak the fd into a child
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


class Segment:
    """One mapped shared-memory segment."""

    def __init__(
        self, name: str, size: int, mapping: mmap.mmap, *, owner: bool, writable: bool, inode: tuple[int, int] = (0, 0)
    ) -> None:
        self.name = name
        self.size = size
        self.inode = inode  # (st_dev, st_ino) of the file mapped: a name can be replaced, the mapping cannot
        self.owner = owner
        self.writable = writable
        self._map: mmap.mmap | None = mapping

    @staticmethod
    def _path(name: str) -> Path:
        if not _NAME.match(name):
            shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
            raise TransportError(f"shared-memory name {shown} must be 1-200 of [A-Za-z0-9_.-], not starting with '.'")
        return SHM_DIR / name

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create a new segment of ``size`` bytes (zero-filled); fails if the name exists."""
        path = cls._path(name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise TransportError(f"shared-memory segment {name!r} already exists") from None
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise TransportError(f"cannot create shared-memory segment {name!r} of {size} bytes: {exc}") from None
        st = os.fstat(fd)
        os.close(fd)
        return cls(name, size, mapping, owner=True, writable=True, inode=(st.st_dev, st.st_ino))

    @classmethod
    def attach(cls, name: str, *, min_size: int = 0, writable: bool = True, populate: bool = True) -> Segment:
        """Map an existing segment; ``min_size`` is checked before anything is touched.

        ``populate=False`` skips faulting the pages in (for a quick look, not for copying).
        """
        path = cls._path(name)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN)
        except FileNotFoundError:
            raise TransportError(f"shared-memory segment {name!r} does not exist") from None
        except OSError as exc:  # ELOOP: a symbolic link; EACCES: not ours to open
            raise TransportError(f"cannot open shared-memory segment {name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TransportError(f"shared-memory segment {name!r} is not a regular file")
            if st.st_uid != os.geteuid():
                raise TransportError(
                    f"shared-memory segment {name!r} is owned by uid {st.st_uid}; only segments of uid "
                    f"{os.geteuid()} (this daemon's) are mapped"
                )
            size = st.st_size
            if size < max(min_size, 1):
                raise TransportError(f"shared-memory segment {name!r} has {size} bytes, {min_size} are needed")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED | (_POPULATE if populate else 0), prot)
            except (OSError, ValueError, OverflowError) as exc:
                raise TransportError(f"cannot map shared-memory segment {name!r} ({size} bytes): {exc}") from None
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=False, writable=writable, inode=(st.st_dev, st.st_ino))

    def watch_fd(self) -> int:
        """A read-only fd of the very file mapped (to see, by its link count, when its owner
        unlinks it); raises TransportError if the name now names another file."""
        try:
            fd = os.open(self._path(self.name), os.O_RDONLY | _OPEN)
        except OSError as exc:
            raise TransportError(f"cannot open shared-memory segment {self.name!r}: {exc.strerror}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.inode:
            os.close(fd)
            raise TransportError(f"shared-memory segment {self.name!r} was replaced while being mapped")
        return fd

    @property
    def buffer(self) -> mmap.mmap:
        if self._map is None:
            raise TransportError(f"shared-memory segment {self.name!r} is closed")
        return self._map

    def close(self) -> None:
        if self._map is not None:
            # BufferError: views into the mapping are still alive (numpy/torch arrays); the
            # mapping goes away with the last of them, dropping our reference is all we can do.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

    def unlink(self) -> None:
        self._path(self.name).unlink(missing_ok=True)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self._map is None else "open"
        return f"Segment({self.name!r}, {self.size} bytes, {'owner' if self.owner else 'mapped'}, {state})"
