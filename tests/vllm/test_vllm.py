"""kvxferd as vLLM's KV connector: the same tokens as one vLLM alone, and every failure ends.

Each test drives the prefill and decode vLLM servers over HTTP (through the proxy, or each
directly) and reads kvxferd's counters: a completion is checked token for token against the
monolithic run, and "moved by kvxferd" is the prefill rank's count of transfers that ended ok.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import ClientSession, ClientTimeout, UnixConnector

from kvxferd.integrations.vllm import harness

Body = dict[str, Any]


def moved(pd: harness.PD) -> int:
    return pd.counters()["prefill-0"].get("result_ok", 0)


def test_every_completion_through_kvxferd_equals_the_monolithic_run(
    pd: harness.PD, bodies: list[Body], reference: dict[str, Any]
) -> None:
    before = moved(pd)
    answers = asyncio.run(harness.complete(pd.proxy.uds, bodies))  # all at once: concurrent requests
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["http_status"] == 200, answer
        assert harness.tokens(answer) == reference[body["prompt"]], f"prompt of {len(body['prompt'].split())} words"
    assert moved(pd) - before == len(bodies), "every prompt's KV must have come through kvxferd"
    long_ones = [b for b in bodies if len(b["prompt"].split()) > harness.PREFILL_BATCH_TOKENS]
    assert long_ones, "some prompts must be long enough to be chunked on prefill"


async def _aborted_prefill(pd: harness.PD, body: Body, xfer: str) -> dict[str, Any]:
    """Decode gets the request; prefill starts it and the client walks away after the first token."""
    timeout = ClientTimeout(total=120)
    decode_body = dict(body, model="tiny", temperature=0.0, ignore_eos=True, return_token_ids=True,
                       kv_transfer_params={"kvxferd": "decode", "xfer": xfer})  # fmt: skip
    prefill_body = dict(body, model="tiny", temperature=0.0, ignore_eos=True, stream=True, max_tokens=1500,
                        kv_transfer_params={"kvxferd": "prefill", "xfer": xfer})  # fmt: skip
    async with (
        ClientSession(connector=UnixConnector(path=str(pd.decode.uds)), timeout=timeout) as dec,
        ClientSession(connector=UnixConnector(path=str(pd.prefill.uds)), timeout=timeout) as pre,
    ):

        async def decode() -> dict[str, Any]:
            async with dec.post("http://localhost/v1/completions", json=decode_body) as resp:
                data: dict[str, Any] = await resp.json(content_type=None)
                data["http_status"] = resp.status
                return data

        task = asyncio.ensure_future(decode())
        resp = await pre.post("http://localhost/v1/completions", json=prefill_body)
        assert resp.status == 200
        await resp.content.readany()  # the prompt is computed; generating goes on
        resp.close()  # the client is gone: vLLM aborts the request
        return await task


def test_an_aborted_prefill_request_is_declined_and_decode_computes_the_prompt_itself(
    pd: harness.PD, reference: dict[str, Any]
) -> None:
    from tests.vllm.conftest import EXTRA

    body, before = EXTRA[0], moved(pd)
    started = time.monotonic()
    answer = asyncio.run(_aborted_prefill(pd, body, "xfer-aborted-1"))
    took = time.monotonic() - started
    assert answer["http_status"] == 200, answer
    assert harness.tokens(answer) == reference[body["prompt"]], "the recomputed completion differs"
    assert moved(pd) == before, "an aborted prompt must not be moved"
    assert took < 20.0, f"decode waited {took:.1f}s: the decline should end its wait, not its 20 s deadline"
    assert "the prefill side declined" in pd.decode.log.read_text(errors="replace")


def test_a_killed_decode_daemon_fails_at_once_and_its_restart_is_written_again(
    pd: harness.PD, reference: dict[str, Any]
) -> None:
    from tests.vllm.conftest import EXTRA

    pd.cluster.daemon("decode-0").popen.kill()
    pd.cluster.daemon("decode-0").popen.wait(10)
    before = moved(pd)
    started = time.monotonic()
    [answer] = asyncio.run(harness.complete(pd.proxy.uds, [EXTRA[1]], timeout_s=120))
    took = time.monotonic() - started
    assert answer["http_status"] == 200, answer
    assert harness.tokens(answer) == reference[EXTRA[1]["prompt"]], "the recomputed completion differs"
    assert took < 20.0, f"the request took {took:.1f}s: a dead decode daemon must be noticed, not waited for"
    assert moved(pd) == before
    pd.cluster.restart("decode-0")
    # the decode worker registers its cache again on its first step after the restart, and each
    # prefill link finds the new daemon on its own schedule (reconnect, then ask again after its
    # backoff): the requests meanwhile are recomputed; one within the deadline is written by kvxferd
    # (3 tries were not always enough on CI's loaded machine)
    deadline, attempt = time.monotonic() + 60.0, 0
    while moved(pd) == before and time.monotonic() < deadline:
        [answer] = asyncio.run(harness.complete(pd.proxy.uds, [EXTRA[2]], timeout_s=120))
        assert answer["http_status"] == 200, answer
        assert harness.tokens(answer) == reference[EXTRA[2]["prompt"]], f"attempt {attempt} differs"
        attempt += 1
    assert moved(pd) > before, f"after the restart, kvxferd never moved a prompt again ({attempt} tries in 60 s)"
