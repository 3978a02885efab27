"""End to end: the `kvxferd` command as a user runs it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvxferd.cli import main

KVXFERD = [sys.executable, "-m", "kvxferd"]


def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVXFERD, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_demo_json_runs_50_requests_all_ok_and_verified() -> None:
    done = run("demo", "--requests", "50", "--json", "--timeout", "120", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == summary["ok"] == summary["verified"] == 50
    assert summary["failed"] == 0
    for key in ("bytes", "seconds", "gbps", "p50_ms", "p99_ms"):
        assert summary[key] > 0, key
    assert summary["chunked"] > 0, "the mix must include chunked prefill"
    assert summary["transports"] == {"shm": 50}
    assert set(summary["daemons"].values()) == {0}


@pytest.mark.slow
@pytest.mark.rdma
def test_demo_over_rdma_runs_50_requests_all_ok_and_verified() -> None:
    pytest.importorskip("nixl_cu12", reason="the rdma extra (NIXL) is not installed")
    done = run("demo", "--transport", "rdma", "--requests", "50", "--json", "--timeout", "150", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == summary["ok"] == summary["verified"] == 50
    assert summary["transports"] == {"rdma": 50}
    assert set(summary["daemons"].values()) == {0}


MAPS = sorted((Path(__file__).parents[2] / "configs" / "maps").glob("*.yaml"))
#: the examples rdma can run (a token-major cache's head slices are copied by shm only)
RDMA_MAPS = [p for p in MAPS if "order: tokens" not in p.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("config", MAPS, ids=[p.stem for p in MAPS])
def test_every_example_deployment_of_different_group_sizes_runs_with_every_head_verified(config: Path) -> None:
    """Issue 24: prefill and decode groups of different sizes (2->4, 4->2, 1->2, 4->1, TP above
    the head count, a replicated cache). The demo checks each decode rank's heads of every block
    against what the prefill ranks holding those heads wrote."""
    done = run("demo", "--config", str(config), "--requests", "40", "--json", "--timeout", "150", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == summary["ok"] == summary["verified"] == 40
    assert set(summary["daemons"].values()) == {0}


@pytest.mark.slow
@pytest.mark.rdma
@pytest.mark.parametrize("config", RDMA_MAPS, ids=[p.stem for p in RDMA_MAPS])
def test_every_example_deployment_runs_over_rdma_too(config: Path) -> None:
    pytest.importorskip("nixl_cu12", reason="the rdma extra (NIXL) is not installed")
    args = ("demo", "--config", str(config), "--transport", "rdma", "--requests", "40", "--json", "--timeout", "150")
    done = run(*args, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] == summary["ok"] == summary["verified"] == 40
    assert summary["transports"] == {"rdma": 40}


@pytest.mark.parametrize("command", ["serve", "barrier", "demo", "status"])
def test_help_explains_every_option(command: str) -> None:
    cmd = main.commands[command]
    for param in cmd.params:
        if getattr(param, "param_type_name", "") == "option":
            assert getattr(param, "help", None), f"{command} {param.name} has no help"
    done = run(command, "--help", timeout=30)
    assert done.returncode == 0
    for param in cmd.params:
        for opt in getattr(param, "opts", []):
            assert opt in done.stdout, f"{opt} missing from `kvxferd {command} --help`"


def test_help_is_fast_and_loads_nothing_heavy() -> None:
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from kvxferd.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('zmq', 'torch', 'numpy', 'yaml', 'cupy', 'nixl_cu12') if m in sys.modules]\n"
        "print(time.perf_counter() - t, heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    seconds, heavy = done.stderr.strip().split(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 1.0


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv: {num_layers: -1}\n")
    done = run("serve", "--config", str(bad), "--group", "prefill", "--rank", "0", timeout=30)
    assert done.returncode != 0
    assert "bad.yaml, key 'kv.num_layers': must be positive" in done.stderr
    done = run("serve", "--rank", "0", timeout=30)
    assert done.returncode != 0 and "use --group" in done.stderr
    done = run("serve", "--group", "prefill", "--rank", "5", timeout=30)
    assert done.returncode != 0 and "rank 5 is outside group 'prefill'" in done.stderr


def _write_config(run_dir: Path, extra: str = "") -> Path:
    path = run_dir / "config.yaml"
    path.write_text(
        f"run_dir: {run_dir}\ntimeouts: {{startup_s: 2, shutdown_s: 5}}\nbarrier: {{timeout_s: 2}}\n" + extra
    )
    return path


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*KVXFERD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_ready(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "no readiness line in time"
    line = proc.stdout.readline()
    assert line, f"exited with {proc.wait(5)} before it was ready"
    ready: dict[str, object] = json.loads(line)
    return ready


def _stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str]:
    """SIGTERM if still running; collect (and close) its output. Returns (status, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


@pytest.fixture
def run_dir() -> object:
    path = Path(tempfile.mkdtemp(prefix="kvx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_group_with_a_missing_rank_refuses_to_start_and_says_which(run_dir: Path) -> None:
    cfg = _write_config(run_dir)
    barrier = _start("barrier", "--config", str(cfg))
    try:
        assert _read_ready(barrier, 30)["role"] == "barrier"
        done = run("serve", "--config", str(cfg), "--group", "prefill", "--rank", "0", timeout=60)
        assert done.returncode != 0
        assert "ranks [1] of group 'prefill' did not start within 2s" in done.stderr
    finally:
        assert _stop(barrier)[0] == 0


def test_ranks_with_different_configs_refuse_to_start(run_dir: Path) -> None:
    cfg_a = _write_config(run_dir)
    cfg_b = run_dir / "other.yaml"
    cfg_b.write_text(cfg_a.read_text() + "kv: {num_layers: 9}\n")
    barrier = _start("barrier", "--config", str(cfg_a))
    ranks = []
    try:
        _read_ready(barrier, 30)
        for rank, cfg in ((0, cfg_a), (1, cfg_b)):
            ranks.append(_start("serve", "--config", str(cfg), "--group", "prefill", "--rank", str(rank)))
        for proc in ranks:
            assert proc.wait(60) != 0
            _, err = _stop(proc)
            assert "run a different configuration" in err
    finally:
        for proc in ranks:
            _stop(proc)
        _stop(barrier)


def test_sigterm_stops_an_idle_group_cleanly(run_dir: Path) -> None:
    cfg = _write_config(run_dir)
    procs = [_start("barrier", "--config", str(cfg))]
    try:
        _read_ready(procs[0], 30)
        for rank in (0, 1):
            procs.append(_start("serve", "--config", str(cfg), "--group", "decode", "--rank", str(rank)))
        for proc in procs[1:]:
            ready = _read_ready(proc, 30)
            assert ready["role"] == "decode" and ready["endpoint"] == f"ipc://{run_dir}/decode-{ready['rank']}.sock"
        started = time.monotonic()
        for proc in reversed(procs):
            code, err = _stop(proc)
            assert code == 0, err
        assert time.monotonic() - started < 15
    finally:
        for proc in procs:
            _stop(proc)
