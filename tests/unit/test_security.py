"""The deployment secret and the CURVE keys made from it."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from kvxferd import security
from kvxferd.config import Config, loads
from kvxferd.errors import ConfigError


def _config(tmp_path: Path) -> Config:
    return dataclasses.replace(loads(""), run_dir=str(tmp_path))


def test_the_secret_is_made_once_owner_only_and_every_process_derives_the_same_keys(tmp_path: Path) -> None:
    config = _config(tmp_path)
    a = security.credentials(config, "daemon")
    path = security.secret_path(config)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600 and path.stat().st_size == security.SECRET_BYTES
    b = security.credentials(config, "daemon")
    engine = security.credentials(config, "engine")
    assert a == b  # the same file, the same keys
    assert engine.mine.public != a.mine.public and engine.daemon_public == a.mine.public
    assert "secret" not in repr(a.mine).lower().replace("keypair", "")  # never printed


def test_a_server_accepts_only_the_key_role_its_domain_allows(tmp_path: Path) -> None:
    config = _config(tmp_path)
    daemon, engine = security.credentials(config, "daemon"), security.credentials(config, "engine")
    assert daemon.accepts("engine", engine.mine.public) and not daemon.accepts("engine", daemon.mine.public)
    assert daemon.accepts("peer", daemon.mine.public) and not daemon.accepts("peer", engine.mine.public)
    assert daemon.accepts("barrier", daemon.mine.public) and not daemon.accepts("barrier", engine.mine.public)
    assert not daemon.accepts("nowhere", daemon.mine.public)
    other = security.credentials(_config(tmp_path / "other"), "engine")  # another deployment's secret
    assert not daemon.accepts("engine", other.mine.public)


@pytest.mark.parametrize("problem", ["group-readable", "symlink", "directory", "short"])
def test_a_secret_others_could_read_or_swap_is_refused(tmp_path: Path, problem: str) -> None:
    config = _config(tmp_path)
    path = security.secret_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    if problem == "group-readable":
        path.write_bytes(os.urandom(32))
        path.chmod(0o640)
    elif problem == "symlink":
        target = tmp_path / "elsewhere"
        target.write_bytes(os.urandom(32))
        target.chmod(0o600)
        path.symlink_to(target)
    elif problem == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"tiny")
        path.chmod(0o600)
    with pytest.raises(ConfigError, match="secret"):
        security.credentials(config, "engine")


def test_a_client_reads_replies_through_the_one_receive_path(tmp_path: Path) -> None:
    """An engine client gets an undecodable reply as Error(bad_message), then the next reply as is."""
    import zmq

    from kvxferd.client import Channel
    from kvxferd.protocol import Ack, Error, ErrorCode, StatusQuery, encode

    config = _config(tmp_path)
    daemon, engine = security.credentials(config, "daemon"), security.credentials(config, "engine")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = security.authenticator(ctx, daemon)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    daemon.server(router, "engine")
    endpoint = f"ipc://{tmp_path}/d.sock"
    router.bind(endpoint)
    ch = Channel(endpoint, credentials=engine, ctx=ctx)
    try:
        ch.send(StatusQuery())
        assert router.poll(10_000)
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, b"\xc1 not msgpack"])
        router.send_multipart([identity, encode(Ack("status"))])
        bad = ch.recv(10.0)
        assert isinstance(bad, Error) and bad.code is ErrorCode.BAD_MESSAGE and endpoint in bad.detail
        assert ch.recv(10.0) == Ack("status")
        assert ch.recv_now() is None
    finally:
        ch.close()
        router.close()
        auth.stop()  # type: ignore[attr-defined]
        ctx.term()
