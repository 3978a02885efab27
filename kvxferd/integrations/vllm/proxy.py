"""One OpenAI-compatible endpoint in front of a prefill and a decode vLLM instance.

For each ``POST /v1/completions`` (or ``/v1/chat/completions``) the proxy
makes a transfer id and sends the request to both instances at once:

- to prefill with ``max_tokens: 1`` and ``kv_transfer_params: {"kvxferd":
  "prefill", "xfer": ID}``: it computes the prompt, and kvxferd moves its KV;
- to decode, as the client sent it, with ``{"kvxferd": "decode", "xfer": ID}``:
  it reserves blocks, offers them to prefill, waits for kvxferd's KVReady, and
  generates. Its answer (streamed or not) is the client's answer.

Neither waits for the other's HTTP answer: they meet through kvxferd. When
the prefill request fails, decode hears a decline (or its own deadline) and
vLLM's ``kv_load_failure_policy`` applies (``recompute``: decode computes
the prompt itself). Other paths (``/v1/models``, ``/health``) go to decode.

    python -m kvxferd.integrations.vllm.proxy --prefill unix:/run/p.sock \\
        --decode unix:/run/d.sock --uds /run/proxy.sock   # or --host 127.0.0.1 --port 8000

Runs in the vLLM venv (aiohttp comes with vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientSession, ClientTimeout, UnixConnector, web

log = logging.getLogger("kvxferd.proxy")

#: Largest request body taken in.
MAX_BODY = 16 << 20


@dataclass(frozen=True)
class Backend:
    """A vLLM server: ``unix:/path`` or ``http://host:port``."""

    target: str

    def session(self, timeout_s: float) -> ClientSession:
        timeout = ClientTimeout(total=timeout_s)
        if self.target.startswith("unix:"):
            return ClientSession(connector=UnixConnector(path=self.target[5:]), timeout=timeout)
        return ClientSession(timeout=timeout)

    def url(self, path: str) -> str:
        return ("http://localhost" if self.target.startswith("unix:") else self.target.rstrip("/")) + path


class Proxy:
    def __init__(self, prefill: Backend, decode: Backend, timeout_s: float = 600.0) -> None:
        self.prefill, self.decode = prefill, decode
        self.timeout_s = timeout_s
        self.sessions: dict[str, ClientSession] = {}
        self.counts = {"requests": 0, "prefill_failed": 0}

    async def start(self, _app: web.Application) -> None:
        self.sessions = {"p": self.prefill.session(self.timeout_s), "d": self.decode.session(self.timeout_s)}

    async def stop(self, _app: web.Application) -> None:
        for s in self.sessions.values():
            await s.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        self.counts["requests"] += 1
        xfer = "xfer-" + secrets.token_hex(8)
        pbody = copy.deepcopy(body)
        pbody.update(max_tokens=1, stream=False, kv_transfer_params={"kvxferd": "prefill", "xfer": xfer})
        pbody.pop("max_completion_tokens", None)
        pbody.pop("stream_options", None)
        dbody = dict(body, kv_transfer_params={"kvxferd": "decode", "xfer": xfer})
        prefill = asyncio.ensure_future(self._prefill(request.path, pbody, xfer))
        try:
            return await self._decode(request, dbody)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await prefill

    async def _prefill(self, path: str, body: dict[str, Any], xfer: str) -> None:
        try:
            async with self.sessions["p"].post(self.prefill.url(path), json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    self.counts["prefill_failed"] += 1
                    log.warning("prefill of %s answered %d: %s", xfer, resp.status, text[:300])
        except Exception as exc:  # the decode side learns from kvxferd; the proxy only reports
            self.counts["prefill_failed"] += 1
            log.warning("prefill of %s failed: %s", xfer, exc)

    async def _decode(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        async with self.sessions["d"].post(self.decode.url(request.path), json=body) as resp:
            if not body.get("stream"):
                data = await resp.read()
                return web.Response(body=data, status=resp.status, content_type=resp.content_type)
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.content_type})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/kvxferd/stats":
            return web.json_response(self.counts)
        data = await request.read()
        url = self.decode.url(request.path_qs)
        async with self.sessions["d"].request(request.method, url, data=data or None) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvxferd-vllm-proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", required=True, help="the prefill vLLM server: unix:/path or http://host:port")
    ap.add_argument("--decode", required=True, help="the decode vLLM server: unix:/path or http://host:port")
    ap.add_argument("--uds", help="serve on this unix socket")
    ap.add_argument("--host", default="127.0.0.1", help="serve on this address (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--timeout-s", type=float, default=600.0, help="longest a request may take")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Proxy(Backend(args.prefill), Backend(args.decode), args.timeout_s).app()
    if args.uds:
        web.run_app(app, path=args.uds, print=lambda _: print(json.dumps({"ready": args.uds}), flush=True))
    else:
        web.run_app(app, host=args.host, port=args.port, print=lambda _: print(json.dumps({"ready": args.port})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
