"""The ``kvxferd`` command line. Heavy modules are imported inside the commands, so
``kvxferd --help`` stays fast."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from kvxferd import __version__

if TYPE_CHECKING:
    from kvxferd.config import Config

CONFIG_HELP = "Deployment YAML (see configs/reference.yaml). Default: the embedded demo deployment."
LOG_HELP = "Log level on stderr: TRACE, DEBUG, INFO, WARNING or ERROR. Default: the config's logging.level."


def _load(path: str | None) -> Config:
    from kvxferd.config import load
    from kvxferd.errors import ConfigError

    try:
        return load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _run_service(make: object, who: str, level: str) -> None:
    from kvxferd.errors import KvxferdError
    from kvxferd.runtime.logs import configure

    configure(level, who)
    try:
        service = make()  # type: ignore[operator]
        sys.exit(service.run())
    except KvxferdError as exc:
        import logging

        logging.getLogger("kvxferd").error("%s", exc)
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kvxferd")
def main() -> None:
    """kvxferd: KV-cache transfer daemon for prefill/decode disaggregated serving.

    One `serve` process per GPU rank and role, one `barrier` process per deployment.
    `demo` runs a whole local deployment and checks every byte.
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--group", help="Which group of the config this daemon belongs to. Needed when the config has several.")
@click.option("--rank", type=int, required=True, help="This daemon's rank within its group (0-based).")
@click.option("--log-level", help=LOG_HELP)
def serve(config_path: str | None, group: str | None, rank: int, log_level: str | None) -> None:
    """Run the daemon of one rank of one group (prefill or decode, as the config says).

    It binds the group's endpoint for this rank, waits until every rank of the group is up with
    the same config (start-up barrier), prints one JSON line {"event": "ready", ...} on stdout,
    then serves until SIGTERM or SIGINT, after which it drains for up to timeouts.shutdown_s.
    Logs go to stderr.
    """
    from kvxferd.errors import ConfigError

    config = _load(config_path)
    try:
        grp = config.group(group)
        config.endpoint(grp, rank)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    def make() -> object:
        if grp.role == "prefill":
            from kvxferd.runtime.prefill import PrefillDaemon

            return PrefillDaemon(config, grp, rank)
        from kvxferd.runtime.decode import DecodeDaemon

        return DecodeDaemon(config, grp, rank)

    _run_service(make, f"{grp.name}:{rank}", log_level or config.logging.level)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--log-level", help=LOG_HELP)
def barrier(config_path: str | None, log_level: str | None) -> None:
    """Run the barrier service at the config's barrier.endpoint.

    Ranks of every group arrive there per request id; it answers release, diverged or expired.
    Prints {"event": "ready", ...} on stdout once bound; serves until SIGTERM or SIGINT.
    """
    config = _load(config_path)

    def make() -> object:
        from kvxferd.runtime.barrier import BarrierService

        return BarrierService(config)

    _run_service(make, "barrier", log_level or config.logging.level)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--group", help="Group of the daemon to ask. Leave out to ask the barrier service.")
@click.option("--rank", type=int, default=0, show_default=True, help="Rank of the daemon to ask.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the answer.")
def status(config_path: str | None, group: str | None, rank: int, timeout: float) -> None:
    """Print what a running daemon is doing, as JSON: state, tables, pending requests, counters."""
    from kvxferd.client import status as ask
    from kvxferd.errors import KvxferdError
    from kvxferd.security import credentials

    config = _load(config_path)
    try:
        endpoint = config.endpoint(config.group(group), rank) if group else config.barrier_endpoint()
        # the barrier serves daemons only; an operator holding the secret holds their keys too
        reply = ask(endpoint, timeout, credentials=credentials(config, "engine" if group else "daemon"))
    except KvxferdError as exc:
        raise click.ClickException(str(exc)) from None
    out = {"role": reply.role, "group": reply.group, "rank": reply.rank, "state": reply.state}
    out.update(json.loads(reply.report))
    click.echo(json.dumps(out, indent=2))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="How many requests to run through the deployment.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the request mix and of the skews.")
@click.option(
    "--transport",
    type=click.Choice(["auto", "shm", "rdma", "cuda_ipc"]),
    default="auto",
    show_default=True,
    help="Transport every request asks for (auto: chosen per peer).",
)
@click.option(
    "--layer-ms",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="Simulated compute time of one layer of one forward step (the transfer overlaps it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results instead of a table.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Give up after this many seconds.")
@click.option("--keep", is_flag=True, help="Keep the run directory (config, daemon logs) afterwards.")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    help="Log level of the daemons (their logs go "
    "to files in the run directory; the tail is shown if something fails).",
)
def demo(
    config_path: str | None,
    num_requests: int,
    seed: int,
    transport: str,
    layer_ms: float,
    as_json: bool,
    timeout: float,
    keep: bool,
    log_level: str,
) -> None:
    """Run a whole deployment locally and verify every byte that reached decode.

    Starts the barrier service and every rank of the config's prefill and decode groups as real
    processes, then plays a prefill engine (workers emit layer signals per step; the scheduler
    sends each cache_info with a random per-rank skew, before or after the layer-0 signal) and a
    decode engine that checks each request's blocks byte for byte the moment KVReady arrives.
    Requests are chunked and unchunked. Exit status 0 only if every request was ok and verified.
    """
    from kvxferd.demo import run
    from kvxferd.errors import KvxferdError

    config = _load(config_path)
    try:
        summary = run(
            config,
            requests=num_requests,
            seed=seed,
            transport=transport,
            timeout_s=timeout,
            keep=keep,
            log_level=log_level,
            progress=not as_json,
            layer_ms=layer_ms,
        )
    except KvxferdError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary.as_dict()) if as_json else summary.table())
    sys.exit(0 if summary.passed else 1)


if __name__ == "__main__":
    main()
