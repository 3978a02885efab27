"""cuda_ipc between two processes on one GPU (skipped, with the reason, where there is none)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvxferd.config import TransportConfig
from kvxferd.core.effects import Run
from kvxferd.errors import TransportUnavailable
from kvxferd.protocol import PeerInfo, RegisterCache, decode
from kvxferd.transports import Transport, load

pytestmark = pytest.mark.gpu


def _gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    pytest.importorskip("cupy", reason="the cuda extra (CuPy) is not installed")


@contextlib.contextmanager
def gpu_engine(*args: str) -> Iterator[tuple[subprocess.Popen[str], RegisterCache, RegisterCache]]:
    """The engine process of :mod:`tests.gpu.gpu_engine` (``args``: its mode), with its two caches."""
    _gpu()
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.gpu.gpu_engine", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert engine.stdin is not None and engine.stdout is not None
    try:
        src = decode(bytes.fromhex(engine.stdout.readline().strip()))
        dst = decode(bytes.fromhex(engine.stdout.readline().strip()))
        assert isinstance(src, RegisterCache) and isinstance(dst, RegisterCache)
        yield engine, src, dst
    finally:
        engine.stdin.close()
        engine.wait(60)
        engine.stdout.close()


def write_and_check(engine: subprocess.Popen[str], transport: Transport, layer: int, runs: list[Run]) -> None:
    """Write ``runs`` of ``layer`` to the open peer, wait for the completion, have the engine check."""
    assert engine.stdin is not None and engine.stdout is not None
    assert transport.post(1, "peer", (layer,), runs) is None
    done = []
    while not done:
        done = transport.poll()
    assert done[0].write_id == 1 and done[0].error is None
    for r in runs:
        engine.stdin.write(f"check {layer} {r.src} {r.dst} {r.length}\n")
    engine.stdin.flush()
    answers = [engine.stdout.readline().strip() for _ in runs]
    assert answers[-1] == "ok", answers


def test_cuda_ipc_copies_runs_between_processes_on_one_gpu() -> None:
    with gpu_engine() as (engine, src, dst):
        assert dst.regions[0].offset > 0, "the destination should sit inside a larger allocation"
        transport = load("cuda_ipc")(TransportConfig(), src)
        transport.open_peer("peer", PeerInfo("decode", 0, "h", "gpu", dst.layout, dst.regions, {}))
        write_and_check(engine, transport, 1, [Run(0, 5, 3), Run(9, 30, 2)])
        refused = transport.post(2, "peer", (0,), [Run(0, 31, 2)])
        assert refused is not None and "refused before writing" in (refused.error or "")
        transport.close()


@pytest.mark.parametrize("order", ["heads", "tokens"])
def test_cuda_ipc_copies_a_slice_of_heads_of_every_block(order: str) -> None:
    """Groups of different sizes (issue 24): head 1 of 2 of every source block into head 0 of 1
    of every destination block, heads outermost (one 2D copy row per block) or tokens (a row per
    token of every block); nothing else of the destination touched."""
    from kvxferd.core.rankmap import Cut

    with gpu_engine("slice", order) as (engine, src, dst):
        head = dst.layout.block_bytes  # the destination holds one head
        tokens = 4
        row = head // tokens
        cut = Cut(head, 0, head) if order == "heads" else Cut(row, 0, row, tokens, 2 * row, row)
        transport = load("cuda_ipc")(TransportConfig(), src)
        transport.open_peer("peer", PeerInfo("decode", 0, "h", "gpu", dst.layout, dst.regions, {}), cut)
        write_and_check(engine, transport, 2, [Run(0, 5, 3), Run(9, 30, 2)])
        transport.close()


def test_cuda_ipc_says_why_it_cannot_run_without_a_gpu() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    from kvxferd.protocol import CacheLayout, Region

    layout = CacheLayout(1, 4, 64)
    gpu_cache = RegisterCache("gpu", layout, (Region(0, 0, b"\0" * 64), Region(0, 1, b"\1" * 64)))
    with pytest.raises(TransportUnavailable, match=r"CuPy is not installed|CUDA is not usable|no GPU"):
        load("cuda_ipc")(TransportConfig(), gpu_cache)
