"""vLLM at different tensor-parallel sizes on the two sides (issue 24): prefill TP 2 -> decode TP 1,
and TP 1 -> TP 2, through kvxferd's rank map (the tiny model's 2 KV heads: one per rank on the TP 2
side, both on the TP 1 side, each head written into its slice of every block).

Each deployment's completions are compared token for token with the monolithic vLLM (TP 1), and
every prefill rank must count an ok transfer for every prompt: the KV came through kvxferd.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kvxferd.integrations.vllm import harness
from tests.vllm.conftest import deployed


@pytest.mark.parametrize("tp", [(2, 1), (1, 2)], ids=["prefill-tp2-decode-tp1", "prefill-tp1-decode-tp2"])
def test_completions_across_different_tp_sizes_equal_the_monolithic_run(
    model: Path, bodies: list[dict[str, Any]], reference: dict[str, Any], tp: tuple[int, int]
) -> None:
    with deployed(model, tp) as pd:
        answers = asyncio.run(harness.complete(pd.proxy.uds, bodies))
        for body, answer in zip(bodies, answers, strict=True):
            assert answer["http_status"] == 200, answer
            assert harness.tokens(answer) == reference[body["prompt"]], f"prompt of {len(body['prompt'].split())} words"
        counters = pd.counters()
        assert len(counters) == tp[0]
        for name, ranks in counters.items():
            assert ranks.get("result_ok", 0) == len(bodies), f"{name}: not every prompt's KV came through kvxferd"
