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
