"""Named fault points: the places where the tests inject failures into a run.

This module exists for the tests. The product calls ``point(NAME, ...)`` or
``value(NAME, x)`` at the places listed below (``POINTS``); a test installs a handler on a point
with ``inject`` (in its own process, or in a child through ``tests/faults/sitecustomize.py``)
to make that place sleep, raise, kill the process or change a value. Without a handler
installed a point costs one test of an empty dict (tens of nanoseconds).

The points:

- ``train.step``: before each optimizer step (the eager step; the captured step only while
  its graph is recorded, since a replay runs no Python).
- ``train.loss``: a value, the summed training loss of each training forward pass (one per
  micro-batch), before its backward. The captured step calls it only while its graph is
  recorded, with ``forwards=``: a device tensor holding the number of training forward passes
  of this process so far, this one included, which the graph advances at every replay; a
  handler there changes the loss with tensor ops on it (the graph records them).
- ``eval.batch``: before the forward pass of each evaluation batch.
- ``checkpoint.save_state``: in ``Checkpointer.save``, after Accelerate's ``save_state`` wrote
  the checkpoint's files into the partial folder (``path=``) and before the trainer state and
  the ``COMPLETE`` manifest; an ``OSError`` raised here is a failed write of the checkpoint.
- ``wandb.log``: before each W&B log call (Accelerate's ``log``, one ``Run.log``); an
  exception raised here is a W&B failure, handled as such.
- ``wandb.finish``: before ``Run.finish``, in the thread that finishes the W&B run.

Standard library only: it is imported at interpreter start-up, before torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

POINTS = (
    "train.step",
    "train.loss",
    "eval.batch",
    "checkpoint.save_state",
    "wandb.log",
    "wandb.finish",
)

_handlers: dict[str, Callable[..., Any]] = {}


def inject(name: str, handler: Callable[..., Any]) -> None:
    """Call ``handler`` at the point ``name`` from now on, replacing any handler there. At a
    ``point`` it is called with the point's keyword arguments; at a ``value`` with the value
    first, and it returns the value to use. Raises ``KeyError`` for a name not in ``POINTS``."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    _handlers[name] = handler


def clear() -> None:
    """Remove every installed handler."""
    _handlers.clear()


def installed(name: str) -> bool:
    """Whether a handler is installed at the point ``name``."""
    return name in _handlers


def point(name: str, **context: Any) -> None:
    """The fault point ``name``: runs its handler, if one is installed."""
    if _handlers:
        _handler(name)(**context)


def value(name: str, x: T, **context: Any) -> T:
    """The fault point ``name`` on a value: ``x``, or what its handler returns for it."""
    if _handlers:
        return _handler(name)(x, **context)
    return x


def _handler(name: str) -> Callable[..., Any]:
    # Only checked while handlers are installed: then a point the product calls by a name
    # missing from POINTS fails loudly instead of never firing.
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}")
    return _handlers.get(name, _no_handler)


def _no_handler(x: Any = None, **context: Any) -> Any:
    return x
