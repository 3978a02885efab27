"""`make vllm-demo`: the tiny Llama through a prefill and a decode vLLM instance joined by kvxferd,
compared token for token with one vLLM instance alone.

Steps: make the model from its seed (build/tiny-llama), run the prompts on a monolithic vLLM,
stop it, start kvxferd (barrier, prefill rank 0, decode rank 0), the two vLLM instances and the
proxy, send the same prompts through the proxy (all at once), and compare the generated token
ids. Exit status 1 if any completion differs. Run with the vLLM venv's python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kvxferd.integrations.vllm import harness
from kvxferd.integrations.vllm.tiny_model import make

REPO = Path(__file__).resolve().parents[1]


def monolithic(model: Path, bodies: list[dict]) -> tuple[list, float]:
    run_dir = Path(tempfile.mkdtemp(prefix="kvx-mono-", dir="/tmp"))
    uds = run_dir / "vllm.sock"
    t0 = time.monotonic()
    server = harness.start_server("monolithic-vllm", harness.vllm_args(model, uds, role=None), run_dir, uds, "0", {})
    try:
        asyncio.run(harness.wait_healthy([server], 240.0))
        answers = asyncio.run(harness.complete(uds, bodies))
    except BaseException:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    return answers, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "build" / "tiny-llama")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    args = ap.parse_args(argv)
    model = make(args.model_dir, seed=0)
    bodies = harness.prompts()
    print(f"model        {model} (seed 0)")
    mono, mono_s = monolithic(model, bodies)
    print(f"monolithic   {len(bodies)} prompts, {mono_s:.1f}s with start-up")
    t0 = time.monotonic()
    pd = harness.start_pd(model)
    try:
        print(f"kvxferd+vLLM started in {pd.timings['start_s']:.1f}s, run dir {pd.run_dir}")
        t1 = time.monotonic()
        answers = asyncio.run(harness.complete(pd.proxy.uds, bodies))
        send_s = time.monotonic() - t1
        counters = pd.counters()
    finally:
        codes = pd.stop()
    same = 0
    compared = 0
    for i, (a, b) in enumerate(zip(mono, answers, strict=True)):
        ta, tb = harness.tokens(a), harness.tokens(b)
        compared += len(ta)
        ok = ta == tb and b.get("http_status") == 200
        same += ok
        n = len(bodies[i]["prompt"].split())
        print(f"prompt {i:2d}    {n:3d} tokens -> {'same' if ok else 'DIFFERENT'}" + ("" if ok else f": {ta} vs {tb}"))
    wall = time.monotonic() - t0
    print(f"compared     {len(bodies)} completions, {compared} generated tokens: {same} identical")
    print(f"wall         disaggregated {wall:.1f}s (start {pd.timings['start_s']:.1f}s, requests {send_s:.1f}s)")
    moved = counters.get("prefill-0", {})
    print(
        f"kvxferd      prefill-0 moved {moved.get('result_ok', 0)} prompts ok ({moved.get('bytes_ok', 0)} bytes), "
        f"{moved.get('result_failed', 0)} failed, {moved.get('result_aborted', 0)} aborted"
    )
    print(f"exit codes   {json.dumps(codes)}")
    if not args.keep:
        shutil.rmtree(pd.run_dir, ignore_errors=True)
    return 0 if same == len(bodies) and moved.get("result_ok", 0) == len(bodies) else 1


if __name__ == "__main__":
    sys.exit(main())
