"""Logging, configured once by the CLI (never at import): identity and pid on every line.

``TRACE`` (level 5) sits below DEBUG for per-message logs; the config's
``logging.level: TRACE`` turns it on.
"""

from __future__ import annotations

import logging
import os
import sys

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s [%(who)s pid=%(process)d] %(name)s: %(message)s"


class _Identity(logging.Filter):
    def __init__(self, who: str) -> None:
        super().__init__()
        self.who = who

    def filter(self, record: logging.LogRecord) -> bool:
        record.who = self.who
        return True


def configure(level: str, who: str) -> None:
    """Send every kvxferd log line to stderr, tagged with ``who`` (e.g. ``prefill:1``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Identity(who))
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    name = level.upper()
    root.setLevel(TRACE if name == "TRACE" else getattr(logging, name))
    # NIXL/UCX chatter is configured separately (transport settings), keep library loggers quiet.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
