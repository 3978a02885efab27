"""The one exception tree of kvxferd.

Everything the project raises on purpose derives from :class:`KvxferdError`.
Wire replies carry an :class:`kvxferd.protocol.ErrorCode`; exceptions that map
to a wire reply name their code in ``code``.
"""

from __future__ import annotations


class KvxferdError(Exception):
    """Base class of every error kvxferd raises on purpose."""


class ConfigError(KvxferdError):
    """A configuration file or value is invalid; the message names file and key."""

    def __init__(self, problem: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ", ".join(p for p in (source, f"key {key!r}" if key else None) if p)
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem = problem
        self.source = source
        self.key = key

    def within(self, *, source: str | None = None, prefix: str = "") -> ConfigError:
        """The same error, placed inside a file and/or below a parent key."""
        key = f"{prefix}.{self.key}" if prefix and self.key else (self.key or prefix or None)
        return ConfigError(self.problem, source=source or self.source, key=key)


class ProtocolError(KvxferdError):
    """A message broke the wire protocol.

    ``LocalProtocolError`` means we were about to send something invalid (a bug
    on our side); ``RemoteProtocolError`` means a peer sent something invalid.
    """


class LocalProtocolError(ProtocolError):
    """We tried to build or send an invalid message."""


class RemoteProtocolError(ProtocolError):
    """A peer sent a frame we cannot accept (malformed, wrong version, oversize...)."""


class StateError(KvxferdError):
    """An illegal state transition was asked for; nothing was changed."""


class TransportError(KvxferdError):
    """A transport failed to register memory, open a peer or move bytes."""


class TransportUnavailable(TransportError):
    """A transport cannot be used in this environment (missing package, no GPU...)."""


class BarrierTimeout(KvxferdError):
    """A named barrier did not release before its deadline."""


class DaemonError(KvxferdError):
    """The daemon could not start, or a client could not reach it in time."""


class CoreBroken(KvxferdError):
    """A core state machine raised: one of its invariants is broken and its tables cannot be
    trusted. The daemon fails every request in flight and exits non-zero."""
