"""Who may talk to whom: the deployment secret and the CURVE keys made from it.

Theory of operation: a deployment shares one secret, a file (``security.
secret_file``, by default ``{run_dir}/secret``) readable by its owner only.
The first process that needs it and finds none creates it (32 random bytes,
written to a temporary name and linked into place, so a reader never sees a
half-written file). Across hosts, copy the file to each host's path.

From the secret, every process derives two CURVE key pairs (ZMQ's
authenticated, encrypted transport): the *daemon* pair, held by daemons and
the barrier service, and the *engine* pair, held by engines and schedulers.
Every server socket runs CURVE and accepts a client only if its public key
is the one its role allows:

============  =========================  =========================
socket        who serves it              whose key it accepts
============  =========================  =========================
engine        each daemon (``endpoint``)  engine
peer          each decode daemon          daemon (prefill ranks)
barrier       the barrier service         daemon
rendezvous    a prefill engine (vLLM      engine
              connector), engine keys
============  =========================  =========================

A process without the secret cannot complete the handshake: its messages
never reach the daemon, and it hears nothing back. Holders of the secret are
the deployment; within a socket, a daemon further checks *which connection*
may say what (see the daemons' modules).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvxferd.errors import ConfigError

if TYPE_CHECKING:
    import zmq

    from kvxferd.config import Config

#: The CURVE pairs a deployment derives; each names who holds it.
KEY_ROLES = ("daemon", "engine")
#: ZAP domains of the server sockets, and the key role each accepts.
DOMAINS = {"engine": "engine", "peer": "daemon", "barrier": "daemon", "rendezvous": "engine"}
#: The key pair each domain's server holds (the rendezvous is served between engines).
SERVED_BY = {"engine": "daemon", "peer": "daemon", "barrier": "daemon", "rendezvous": "engine"}
SECRET_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public.decode()!r})"


@dataclass(frozen=True)
class Credentials:
    """What one process needs to reach (and, for daemons, to serve) a deployment's sockets."""

    mine: KeyPair  # the pair this process presents as a client
    daemon_public: bytes  # every server socket's public key (servers hold the daemon pair)
    allowed: dict[str, bytes]  # key role -> its public key, for a server's ZAP checks

    def client(self, sock: zmq.Socket[bytes], domain: str = "engine") -> None:
        """Make ``sock`` a CURVE client of a deployment server of ``domain`` (call before ``connect``)."""
        import zmq

        server = self.daemon_public if SERVED_BY.get(domain, "daemon") == "daemon" else self.allowed["engine"]
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.mine.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.mine.secret)

    def server(self, sock: zmq.Socket[bytes], domain: str) -> None:
        """Make ``sock`` a CURVE server whose clients are checked in ZAP ``domain`` (call before ``bind``)."""
        import zmq

        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}")
        if self.mine.public != self.allowed[SERVED_BY[domain]]:
            raise ValueError(f"only a holder of the {SERVED_BY[domain]} keys can serve a {domain} socket")
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.mine.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.mine.public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)

    def accepts(self, domain: str, public_z85: bytes) -> bool:
        """Whether a client presenting ``public_z85`` may connect to a socket of ``domain``."""
        role = DOMAINS.get(domain)
        return role is not None and secrets.compare_digest(self.allowed[role], public_z85)


def keypair(secret: bytes, role: str) -> KeyPair:
    """The CURVE pair of ``role`` derived from the deployment secret (the same in every process)."""
    import zmq
    from zmq.utils import z85

    if role not in KEY_ROLES:
        raise ValueError(f"unknown key role {role!r}")
    seed = hashlib.blake2b(secret, digest_size=32, person=b"kvxferd-curve", salt=role.encode()[:16]).digest()
    private = z85.encode(seed)
    return KeyPair(zmq.curve_public(private), private)


def credentials(config: Config, role: str) -> Credentials:
    """Credentials for a process of ``role`` (``daemon`` or ``engine``) in ``config``'s deployment."""
    secret = read_secret(config)
    pairs = {r: keypair(secret, r) for r in KEY_ROLES}
    return Credentials(pairs[role], pairs["daemon"].public, {r: p.public for r, p in pairs.items()})


def secret_path(config: Config) -> Path:
    return Path(config.expand(config.security.secret_file))


def read_secret(config: Config) -> bytes:
    """The deployment secret, created if it does not exist yet; refuses a file others can read."""
    path = secret_path(config)
    if not path.exists():
        _create(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        text = f"cannot open the deployment secret {path}: {exc.strerror}"
        raise ConfigError(text, key="security.secret_file") from None
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not {os.geteuid()}"
        elif st.st_mode & 0o077:
            problem = f"has mode {stat.S_IMODE(st.st_mode):o}; group and others must have no access (chmod 600)"
        elif not 16 <= st.st_size <= 4096:
            problem = f"holds {st.st_size} bytes; a secret is 16 to 4096 bytes"
        if problem is not None:
            raise ConfigError(f"the deployment secret {path} {problem}", key="security.secret_file")
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # atomic, and fails if another process made it first: then theirs is the secret
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)


class _Provider:
    """The ZAP check pyzmq's authenticator calls for every CURVE handshake: the key, then the gate."""

    def __init__(self, creds: Credentials, gate: Callable[[], bool] | None) -> None:
        self.creds = creds
        self.gate = gate

    def callback(self, domain: str, key: bytes) -> bool:
        return self.creds.accepts(domain, key) and (self.gate is None or self.gate())


def authenticator(
    ctx: zmq.Context[zmq.Socket[bytes]], creds: Credentials, gate: Callable[[], bool] | None = None
) -> object:
    """Start the ZAP handler of ``ctx`` (a thread owned by the caller: call ``.stop()`` before
    terminating the context). Start it before binding any server socket. ``gate``: asked (from
    that thread) for every client whose key is accepted; False refuses it too."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    for domain in DOMAINS:
        auth.configure_curve_callback(domain, credentials_provider=_Provider(creds, gate))
    return auth
