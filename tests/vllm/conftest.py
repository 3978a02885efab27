"""tests/vllm: kvxferd under real vLLM CPU instances (marker ``vllm``; `make test-vllm`, in .venv-vllm).

One deployment per module: the tiny model (made from its seed), the answers of a monolithic vLLM
to every prompt the tests send, then kvxferd + a prefill and a decode vLLM + the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM venv: make test-vllm")

from kvxferd.integrations.vllm import harness  # noqa: E402
from kvxferd.integrations.vllm.tiny_model import make  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vllm" in str(item.path):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def model() -> Path:
    return make(REPO / "build" / "tiny-llama", seed=0)


#: Prompts the failure tests send on their own (their monolithic answers are taken with the rest).
EXTRA = [
    {"prompt": " ".join(f"w{(7 * i) % 500}" for i in range(120)), "max_tokens": 16},
    {"prompt": " ".join(f"w{(11 * i) % 500}" for i in range(40)), "max_tokens": 16},
    {"prompt": " ".join(f"w{(13 * i) % 500}" for i in range(70)), "max_tokens": 16},
]


@pytest.fixture(scope="session")
def bodies() -> list[dict[str, Any]]:
    return harness.prompts() + EXTRA


@pytest.fixture(scope="session")
def reference(model: Path, bodies: list[dict[str, Any]]) -> dict[str, list[int] | str]:
    """The monolithic vLLM's generated tokens, by prompt."""
    run_dir = Path(tempfile.mkdtemp(prefix="kvx-mono-", dir="/tmp"))
    uds = run_dir / "vllm.sock"
    server = harness.start_server("monolithic-vllm", harness.vllm_args(model, uds, role=None), run_dir, uds, "0", {})
    try:
        asyncio.run(harness.wait_healthy([server], 240.0))
        answers = asyncio.run(harness.complete(uds, bodies))
    finally:
        code = server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    assert code == 0, "the monolithic vLLM did not exit cleanly"
    assert all(a["http_status"] == 200 for a in answers), answers
    return {b["prompt"]: harness.tokens(a) for b, a in zip(bodies, answers, strict=True)}


@contextlib.contextmanager
def deployed(model: Path, tp: tuple[int, int] = (1, 1)) -> Iterator[harness.PD]:
    """kvxferd, the two vLLM instances (at tensor-parallel sizes ``tp``) and the proxy; every process
    must exit cleanly and leave no shared-memory segment behind."""
    dep = harness.start_pd(model, extra={"wait_s": 20.0, "offer_s": 20.0}, tp=tp)
    try:
        yield dep
    finally:
        codes = dep.stop()
        leftovers = [p.name for p in Path("/dev/shm").glob("kvx-vllm-*")]
        shutil.rmtree(dep.run_dir, ignore_errors=True)
    assert leftovers == [], f"shared-memory segments outlived the deployment: {leftovers}"
    assert set(codes.values()) <= {0, -15}, f"processes did not exit cleanly: {codes}"


@pytest.fixture(scope="module")
def pd(model: Path, reference: dict[str, Any]) -> Iterator[harness.PD]:
    with deployed(model) as dep:
        yield dep
