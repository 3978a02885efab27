"""cuda_ipc between two processes on one GPU (skipped, with the reason, where there is none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvxferd.config import TransportConfig
from kvxferd.core.effects import Run
from kvxferd.errors import TransportUnavailable
from kvxferd.protocol import PeerInfo, RegisterCache, decode
from kvxferd.transports import load

pytestmark = pytest.mark.gpu


def _gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    pytest.importorskip("cupy", reason="the cuda extra (CuPy) is not installed")


def test_cuda_ipc_copies_runs_between_processes_on_one_gpu() -> None:
    _gpu()
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.gpu.gpu_engine"],
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
        assert dst.regions[0].offset > 0, "the destination should sit inside a larger allocation"
        transport = load("cuda_ipc")(TransportConfig(), src)
        peer = PeerInfo("decode", 0, "h", "gpu", dst.layout, dst.regions, {})
        transport.open_peer("peer", peer)
        runs = [Run(0, 5, 3), Run(9, 30, 2)]
        assert transport.post(1, "peer", 1, runs) is None
        done = []
        while not done:
            done = transport.poll()
        assert done[0].write_id == 1 and done[0].error is None
        for r in runs:
            engine.stdin.write(f"check 1 {r.src} {r.dst} {r.length}\n")
        engine.stdin.flush()
        answers = [engine.stdout.readline().strip() for _ in runs]
        assert answers[-1] == "ok", answers
        refused = transport.post(2, "peer", 0, [Run(0, 31, 2)])
        assert refused is not None and "refused before writing" in (refused.error or "")
        transport.close()
    finally:
        engine.stdin.close()
        engine.wait(60)
        engine.stdout.close()


@pytest.mark.parametrize("order", ["heads", "tokens"])
def test_cuda_ipc_copies_a_slice_of_heads_of_every_block(order: str) -> None:
    """Groups of different sizes (issue 24): head 1 of 2 of every source block into head 0 of 1
    of every destination block, heads outermost (one 2D copy row per block) or tokens (a row per
    token of every block); nothing else of the destination touched."""
    _gpu()
    from kvxferd.core.rankmap import Cut

    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.gpu.gpu_engine", "slice", order],
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
        head = dst.layout.block_bytes  # the destination holds one head
        tokens = 4
        row = head // tokens
        cut = Cut(head, 0, head) if order == "heads" else Cut(row, 0, row, tokens, 2 * row, row)
        transport = load("cuda_ipc")(TransportConfig(), src)
        transport.open_peer("peer", PeerInfo("decode", 0, "h", "gpu", dst.layout, dst.regions, {}), cut)
        runs = [Run(0, 5, 3), Run(9, 30, 2)]
        assert transport.post(1, "peer", 2, runs) is None
        done = []
        while not done:
            done = transport.poll()
        assert done[0].write_id == 1 and done[0].error is None
        for r in runs:
            engine.stdin.write(f"check 2 {r.src} {r.dst} {r.length}\n")
        engine.stdin.flush()
        answers = [engine.stdout.readline().strip() for _ in runs]
        assert answers[-1] == "ok", answers
        transport.close()
    finally:
        engine.stdin.close()
        engine.wait(60)
        engine.stdout.close()


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
