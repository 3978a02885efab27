"""A core behind a guard: any exception out of it is a broken invariant, not a bad message.

The shells hand every message to a pure core. A bad message is the core's to
refuse (it returns a ``Problem``); an exception out of it means its tables are
no longer what its invariants say, so going on would end requests wrongly.
:func:`guarded` wraps the core so that every call that raises becomes
:class:`~kvxferd.errors.CoreBroken`, which the service loop turns into "fail
every request in flight, then exit non-zero" (see :mod:`kvxferd.runtime.service`).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar, cast

from kvxferd.errors import CoreBroken
from kvxferd.protocol.fields import clip

T = TypeVar("T")


class _Guard:
    __slots__ = ("_calls", "_inner", "_name")

    def __init__(self, inner: object, name: str) -> None:
        self._inner = inner
        self._name = name
        self._calls: dict[str, Any] = {}  # method name -> its guarded wrapper, built once (hot path)

    def __getattr__(self, attr: str) -> Any:
        cached = self._calls.get(attr)
        if cached is not None:
            return cached
        value = getattr(self._inner, attr)
        if not callable(value):
            return value  # (data: read through every time)
        inner, name = self._inner, self._name

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(inner, attr)(*args, **kwargs)  # (looked up at each call: what the core has now)
            except CoreBroken:
                raise
            except Exception as exc:
                raise CoreBroken(f"{name}.{attr} raised {type(exc).__name__}: {clip(str(exc), 300)}") from exc

        self._calls[attr] = call
        return call


def guarded(inner: T, name: str) -> T:
    """``inner`` with every method call guarded (see the module's docstring)."""
    return cast(T, _Guard(inner, name))


def unguarded(value: T) -> T:
    """The object behind a guard (for the last words of a broken daemon)."""
    inner = value._inner if isinstance(value, _Guard) else value
    return cast(T, inner)
