"""Cache registrations that name what is not a cache: refused with a reason, never mapped,
never hanging the daemon; prefill checks what decode checks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from kvxferd.protocol import Error, ErrorCode, RegisterCache, encode
from kvxferd.shm import SHM_DIR, unique_name
from tests.hostile.conftest import Hostile

ROLES = ["prefill", "decode"]


def _naming(reg: RegisterCache, handle: str) -> RegisterCache:
    regions = tuple(dataclasses.replace(r, handle=handle) for r in reg.regions)
    return dataclasses.replace(reg, regions=regions)


@contextlib.contextmanager
def shm_file(kind: str, size: int) -> Iterator[str]:
    """A /dev/shm entry of ``kind`` that is not a cache this daemon may map."""
    name = unique_name("kvx-hostile")
    path = SHM_DIR / name
    target = Path(f"/tmp/{name}.target")
    try:
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        elif kind == "symlink":
            target.write_bytes(b"\0" * size)
            path.symlink_to(target)
        elif kind == "foreign":
            path.write_bytes(b"\0" * size)
            os.chown(path, 12345, 12345)
        elif kind == "small":
            path.write_bytes(b"\0" * 100)
        elif kind == "directory":
            path.mkdir()
        yield name
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


KINDS = ["fifo", "symlink", "small", "directory", "missing"] + (["foreign"] if os.geteuid() == 0 else [])


@pytest.mark.parametrize("role", ROLES)
def test_registrations_of_what_is_not_a_cache_are_refused_and_nothing_hangs(dep: Hostile, probes, role: str) -> None:
    group = dep.prefill if role == "prefill" else dep.decode
    endpoint = dep.config.endpoint(group, 0)
    legit = dep.pcaches[0].registration()
    size = legit.layout.region_bytes * 2 * legit.layout.num_layers
    attacker = probes(endpoint, credentials=dep.creds)
    for kind in KINDS:
        with shm_file(kind, size) as name:
            answer = attacker.ask(_naming(legit, name))
            assert isinstance(answer, Error) and answer.code is ErrorCode.BAD_LAYOUT, (kind, answer)
            assert name in answer.detail, answer.detail
    for name in (".", "..", "...", "-", ".hidden", "../../etc/passwd", "a/b"):
        frame_answer = attacker.ask(_naming(legit, name))
        assert isinstance(frame_answer, Error) and frame_answer.code in (ErrorCode.BAD_LAYOUT, ErrorCode.BAD_MESSAGE)
    dep.still_fine(f"after-bad-registrations-{role}")


@pytest.mark.parametrize("role", ROLES)
def test_overlapping_regions_are_refused_at_the_edge(dep: Hostile, probes, role: str) -> None:
    group = dep.prefill if role == "prefill" else dep.decode
    attacker = probes(dep.config.endpoint(group, 0), credentials=dep.creds)
    legit = dep.pcaches[0].registration()
    first = legit.regions[0]
    # layer 0's V region starts half-way into its K region
    half = legit.layout.region_bytes // 2
    overlapping = tuple(
        dataclasses.replace(r, offset=first.offset + half) if (r.layer, r.kv) == (0, 1) else r for r in legit.regions
    )
    frame = encode(legit)  # a valid frame, then the overlapping regions written in by hand
    items = msgpack.unpackb(frame, raw=False)
    items[4] = [[r.layer, r.kv, r.handle, r.offset, r.device] for r in overlapping]
    for _ in range(2):  # twice: the second registration is what crashed decode before
        answer = attacker.ask(msgpack.packb(items, use_bin_type=True))
        assert isinstance(answer, Error) and answer.code is ErrorCode.BAD_MESSAGE and "overlap" in answer.detail
    dep.still_fine(f"after-overlap-{role}")
