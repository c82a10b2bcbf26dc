"""Named fault points, where the tests make a run sleep, raise, die or see another value: the
product calls ``point`` or ``value`` at each of ``POINTS``, and a test installs a handler there
with ``inject``, in its own process or in a child through ``tests/faults/sitecustomize.py``
(hence standard library only). With none installed, a point costs a test of an empty dict. A
replay of the captured step's graph runs no Python: ``train.step`` and ``train.loss`` fire only
while it is recorded, ``train.loss`` with ``forwards=``, a device tensor each replay advances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

POINTS = (
    "train.step",  # before each optimizer step
    "train.loss",  # a value: each micro-batch's summed training loss, before its backward
    "eval.batch",  # before each evaluation batch's forward pass
    "checkpoint.save_state",  # after save_state filled the partial folder (path=), before COMPLETE
    "wandb.log",  # before each W&B log call
    "wandb.finish",  # before Run.finish, in the thread that finishes the W&B run
)

_handlers: dict[str, Callable[..., Any]] = {}


def inject(name: str, handler: Callable[..., Any]) -> None:
    """Call ``handler`` at ``name`` from now on (at a ``value``: with the value first, returning
    the one to use); ``KeyError`` for a name not in ``POINTS``."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    _handlers[name] = handler


def clear() -> None:
    _handlers.clear()


def installed(name: str) -> bool:
    return name in _handlers


def point(name: str, **context: Any) -> None:
    if _handlers:
        _handler(name)(**context)


def value(name: str, x: T, **context: Any) -> T:
    """``x``, or what the handler at ``name`` returns for it."""
    if _handlers:
        return _handler(name)(x, **context)
    return x


def _handler(name: str) -> Callable[..., Any]:
    # While faults are on, a point the product calls by a name missing from POINTS fails loudly.
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}")
    return _handlers.get(name, lambda x=None, **context: x)
