"""Start kvxferd, two vLLM CPU instances and the proxy; send prompts; compare with one vLLM alone.

What ``make vllm-demo`` and ``tests/vllm`` run (in the vLLM venv). Every server
listens on a unix socket in the run directory: nothing binds a network port.
Readiness is each server's ``/health`` answering, polled with a deadline while
its process is checked to be alive; logs go to one file per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvxferd import config as kvconfig
from kvxferd.demo.launch import Cluster, prepare
from kvxferd.errors import DaemonError
from kvxferd.integrations.vllm.tiny_model import words

#: What vLLM needs to stay on this host and quiet (no usage statistics, loopback queues).
ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
BLOCK_TOKENS, NUM_BLOCKS = 32, 512  # must equal configs/vllm-tiny.yaml's kv section
#: The prefill instance's token budget per step: prompts longer than this are chunked.
PREFILL_BATCH_TOKENS = 64
REPO = Path(__file__).resolve().parents[3]
KVX_CONFIG = REPO / "configs" / "vllm-tiny.yaml"


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    uds: Path
    log: Path

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def vllm_args(
    model: Path, uds: Path, *, role: str | None, kvx_config: Path = KVX_CONFIG, extra: dict[str, Any] | None = None
) -> list[str]:
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--uds", str(uds), "--served-model-name", "tiny",
        "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--block-size", str(BLOCK_TOKENS), "--num-gpu-blocks-override", str(NUM_BLOCKS),
        "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "2048",
        "--no-enable-prefix-caching", "--max-num-seqs", "16",
    ]  # fmt: skip
    if role is not None:
        transfer = {
            "kv_connector": "KvxferdConnector",
            "kv_connector_module_path": "kvxferd.integrations.vllm.connector",
            "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"config": str(kvx_config), **(extra or {})},
        }
        args += ["--kv-transfer-config", json.dumps(transfer)]
    if role == "prefill":
        args += ["--max-num-batched-tokens", str(PREFILL_BATCH_TOKENS), "--enable-chunked-prefill"]
    return args


def start_server(name: str, args: list[str], run_dir: Path, uds: Path, core: str, env: dict[str, str]) -> Server:
    log = run_dir / f"{name}.log"
    full = dict(os.environ, **ENV, **env, VLLM_CPU_OMP_THREADS_BIND=core)
    with log.open("wb") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full, cwd=run_dir)
    return Server(name, popen, uds, log)


async def wait_healthy(servers: list[Server], timeout_s: float) -> None:
    from aiohttp import ClientSession, UnixConnector

    deadline = time.monotonic() + timeout_s
    for s in servers:
        while True:
            if s.popen.poll() is not None:
                raise DaemonError(f"{s.name} exited with {s.popen.returncode} before it served:\n{s.tail()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"{s.name} did not serve within {timeout_s:g}s:\n{s.tail()}")
            if s.uds.exists():
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    async with (
                        ClientSession(connector=UnixConnector(path=str(s.uds))) as http,
                        http.get("http://localhost/health", timeout=2) as resp,
                    ):
                        if resp.status == 200:
                            break
            await asyncio.sleep(0.5)  # a poll interval for a process we do not control, not a synchronisation


def prompts(seed: int = 0) -> list[dict[str, Any]]:
    """Short prompts, long ones (chunked on prefill), and the same prompt twice."""
    rng = random.Random(seed)
    vocab = words(500)
    lengths = [3, 7, 16, 31, 32, 33, 50, 64, 65, 100, 150, 200, 300, 17, 17]
    out = [{"prompt": " ".join(rng.choice(vocab) for _ in range(n)), "max_tokens": 16} for n in lengths]
    out.append(dict(out[-1]))
    return out


async def complete(uds: Path, bodies: list[dict[str, Any]], timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Send every body at once (concurrent requests); each answer as JSON, in order."""
    from aiohttp import ClientSession, ClientTimeout, UnixConnector

    async with ClientSession(connector=UnixConnector(path=str(uds)), timeout=ClientTimeout(total=timeout_s)) as http:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            full = dict(body, model="tiny", temperature=0.0, ignore_eos=True, return_token_ids=True)
            async with http.post("http://localhost/v1/completions", json=full) as resp:
                data: dict[str, Any] = await resp.json(content_type=None)
                data["http_status"] = resp.status
                return data

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def tokens(answer: dict[str, Any]) -> list[int] | str:
    """The generated token ids of an answer (its text where the server gave no ids)."""
    choice = (answer.get("choices") or [{}])[0]
    ids = choice.get("token_ids")
    return list(ids) if ids is not None else str(choice.get("text"))


@dataclass
class PD:
    """A running disaggregated deployment: kvxferd daemons, prefill and decode vLLM, the proxy."""

    run_dir: Path
    cluster: Cluster
    prefill: Server
    decode: Server
    proxy: Server
    kvx_path: Path
    timings: dict[str, float] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)  # segments the harness removed for dead workers
    #: vLLM's own shared-memory segments before this deployment started (at TP > 1 its workers'
    #: segments outlive them when the servers are stopped: the new ones are removed at stop)
    vllm_segments: set[str] = field(default_factory=set)

    @property
    def servers(self) -> list[Server]:
        return [self.proxy, self.decode, self.prefill]

    def counters(self, role: str = "prefill") -> dict[str, dict[str, int]]:
        """The counters of each kvxferd rank of ``role`` (what it moved), by daemon name."""
        from kvxferd.client import credentials, status

        cfg = self.cluster.config
        creds = credentials(cfg)
        out = {}
        for group in (g for g in cfg.groups if g.role == role):
            for rank in range(group.world_size):
                reply = status(cfg.endpoint(group, rank), credentials=creds)
                out[f"{group.name}-{rank}"] = json.loads(reply.report).get("counters", {})
        return out

    def stop(self) -> dict[str, int]:
        codes = {s.name: s.stop() for s in self.servers}
        codes.update(self.cluster.stop())
        self.orphans = remove_orphan_segments()
        for path in Path("/dev/shm").glob("vllm_dist_*"):  # (every server of ours has stopped)
            if path.name not in self.vllm_segments:
                path.unlink(missing_ok=True)
                self.orphans.append(path.name)
        return codes


def remove_orphan_segments(grace_s: float = 15.0) -> list[str]:
    """Unlink the connector's KV segments whose vLLM worker is dead. The worker unlinks its own
    at exit, but vLLM may end its workers without running their exit hooks; the segment names
    carry the worker's pid (``kvx-vllm-GROUP-RANK-PID-...``)."""
    removed = []
    deadline = time.monotonic() + grace_s  # a worker may still be exiting after its server did
    for path in Path("/dev/shm").glob("kvx-vllm-*"):
        parts = path.name.split("-")
        pid = int(parts[4]) if len(parts) > 5 and parts[4].isdigit() else 0
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # a process we did not start: nothing to wait on but its /proc entry
        if pid and not Path(f"/proc/{pid}").exists() and path.exists():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def start_pd(
    model: Path, timeout_s: float = 240.0, extra: dict[str, Any] | None = None, tp: tuple[int, int] = (1, 1)
) -> PD:
    """kvxferd, a prefill and a decode vLLM and the proxy; ``tp``: the two instances' tensor-parallel
    sizes (each kvxferd group gets that many ranks; the rank map slices heads between them)."""
    base = kvconfig.load(KVX_CONFIG)
    sizes = {"prefill": tp[0], "decode": tp[1]}
    base = dataclasses.replace(
        base, groups=tuple(dataclasses.replace(g, world_size=sizes[g.role]) for g in base.groups)
    )
    cfg, path, run_dir = prepare(base, prefix="kvx-vllm-")
    before = {p.name for p in Path("/dev/shm").glob("vllm_dist_*")}
    t0 = time.monotonic()
    cluster = Cluster(cfg, path, run_dir, "INFO")
    cluster.start(60.0)
    p_uds, d_uds, x_uds = run_dir / "prefill-vllm.sock", run_dir / "decode-vllm.sock", run_dir / "proxy.sock"
    env = {"PYTHONPATH": str(REPO)}
    # the connectors read the run's own copy of the config (its run_dir)
    pargs = vllm_args(model, p_uds, role="prefill", kvx_config=path, extra=extra)
    dargs = vllm_args(model, d_uds, role="decode", kvx_config=path, extra=extra)
    pargs += ["--tensor-parallel-size", str(tp[0])]
    dargs += ["--tensor-parallel-size", str(tp[1])]
    # one core per instance, shared by its TP workers (vLLM separates each worker's binding with |)
    prefill = start_server("prefill-vllm", pargs, run_dir, p_uds, "|".join(["0"] * tp[0]), env)
    decode = start_server("decode-vllm", dargs, run_dir, d_uds, "|".join(["1"] * tp[1]), env)
    proxy_args = [
        sys.executable, "-m", "kvxferd.integrations.vllm.proxy",
        "--prefill", f"unix:{p_uds}", "--decode", f"unix:{d_uds}", "--uds", str(x_uds),
    ]  # fmt: skip
    proxy = start_server("proxy", proxy_args, run_dir, x_uds, "0", env)
    pd = PD(run_dir, cluster, prefill, decode, proxy, path, vllm_segments=before)
    try:
        asyncio.run(wait_healthy([prefill, decode, proxy], timeout_s))
    except BaseException:
        pd.stop()
        raise
    pd.timings["start_s"] = time.monotonic() - t0
    return pd
