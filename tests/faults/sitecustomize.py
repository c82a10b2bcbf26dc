"""Fault injection for the subprocesses the tests start (never imported by mnist-dist itself).

A test puts this folder on the child's PYTHONPATH (``helpers.fault_env``) and sets variables
below; Python imports this module at start-up, in every process a launcher starts too. Without
the variables it does nothing. The product's faults go in through the named points of
``mnist_dist.faults`` (the point is given for each): a point the product no longer calls fails
the test that lists the points, and a name that is not a point fails here, at start-up.

Training and checkpoints:
- MNIST_DIST_FAULT_STEP_SLEEP=S      sleep S seconds in every optimizer step (time to send a
                                     signal mid-epoch); ``train.step``
- MNIST_DIST_FAULT_KILL_IN_SAVE=N    SIGKILL this process in the N-th checkpoint save, after
                                     Accelerate wrote its files and before the manifest
                                     (``COMPLETE``); ``checkpoint.save_state``
- MNIST_DIST_FAULT_ENOSPC_IN_SAVE=N  the N-th checkpoint save fails with "No space left on
                                     device", after Accelerate wrote its files;
                                     ``checkpoint.save_state``
- MNIST_DIST_FAULT_EVAL_SLEEP=S      sleep S seconds in every evaluation batch; ``eval.batch``
- MNIST_DIST_FAULT_NAN_AT_STEP=N     the training loss of the N-th training forward pass (counted
                                     in this process) becomes NaN, in eager and captured steps
                                     alike (there counted on the device); ``train.loss``
W&B:
- MNIST_DIST_FAULT_WANDB_LOG_RAISES_AFTER=N  W&B's log call raises ``OSError(ENOSPC)`` from its
                                     N+1-th call on, as when the disk holding the run fills up;
                                     ``wandb.log``
- MNIST_DIST_FAULT_WANDB_FINISH_SLEEPS=S     the W&B run's finish sleeps S seconds first, as when
                                     an upload hangs on a dead network; ``wandb.finish``
Every point:
- MNIST_DIST_FAULT_COUNT_POINTS=PATH at exit, write to PATH.<pid> how often each point of
                                     ``mnist_dist.faults.POINTS`` was reached (JSON)
Imports (these fake the environment, not the product):
- MNIST_DIST_FAULT_HIDE_MODULES=a,b  importing those top-level modules fails as if not installed
- MNIST_DIST_FAULT_RECORD_WANDB_IMPORT=PATH  at exit, write to PATH.<pid> the wandb modules that
                                     were imported
"""

import os
import sys
from collections.abc import Callable

_PRODUCT_FAULTS = (
    "STEP_SLEEP",
    "EVAL_SLEEP",
    "NAN_AT_STEP",
    "KILL_IN_SAVE",
    "ENOSPC_IN_SAVE",
    "WANDB_LOG_RAISES_AFTER",
    "WANDB_FINISH_SLEEPS",
    "COUNT_POINTS",
)


def _env(name: str) -> str:
    return os.environ.get(f"MNIST_DIST_FAULT_{name}", "")


def _install_product_faults() -> None:
    import errno
    import signal
    import time

    from mnist_dist import faults

    def counter() -> Callable[[], int]:
        """A function that returns how often it was called, itself included."""
        calls = [0]

        def count() -> int:
            calls[0] += 1
            return calls[0]

        return count

    if _env("COUNT_POINTS"):
        _count_points(faults, _env("COUNT_POINTS"))

    if sleep := float(_env("STEP_SLEEP") or 0):
        faults.inject("train.step", lambda: time.sleep(sleep))

    if eval_sleep := float(_env("EVAL_SLEEP") or 0):
        faults.inject("eval.batch", lambda: time.sleep(eval_sleep))

    if nan_at := int(_env("NAN_AT_STEP") or 0):
        forward = counter()

        def nan_loss(loss, forwards=None):
            if forwards is not None:  # the captured step: counted on the device, per replay
                import torch

                # Added: a selected loss * nan would put NaN in every pass's gradient.
                return loss + torch.where(forwards == nan_at, float("nan"), 0.0).view(())
            return loss * float("nan") if forward() == nan_at else loss

        faults.inject("train.loss", nan_loss)

    kill_in, enospc_in = int(_env("KILL_IN_SAVE") or 0), int(_env("ENOSPC_IN_SAVE") or 0)
    if kill_in or enospc_in:
        save = counter()

        def faulty_save(path) -> None:
            n = save()
            if n == kill_in:
                os.kill(os.getpid(), signal.SIGKILL)
            if n == enospc_in:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        faults.inject("checkpoint.save_state", faulty_save)

    if log_raises_after := _env("WANDB_LOG_RAISES_AFTER"):
        log = counter()

        def faulty_log() -> None:
            if log() > int(log_raises_after):
                raise OSError(errno.ENOSPC, "No space left on device")

        faults.inject("wandb.log", faulty_log)

    if finish_sleep := float(_env("WANDB_FINISH_SLEEPS") or 0):
        faults.inject("wandb.finish", lambda: time.sleep(finish_sleep))


def _count_points(faults, path: str) -> None:
    """Count every point (a fault of the variables above, installed later, replaces the count of
    its point)."""
    import atexit
    import json

    counts = dict.fromkeys(faults.POINTS, 0)

    def counting(name: str):
        def count(x=None, **context):
            counts[name] += 1
            return x

        return count

    for name in faults.POINTS:
        faults.inject(name, counting(name))

    def record() -> None:
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(counts, f)

    atexit.register(record)


def _hide_modules(names: list[str]) -> None:
    import importlib.abc
    import sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None

    sys.meta_path.insert(0, Hide())


def _record_wandb_import(path: str) -> None:
    import atexit
    import sys

    def record() -> None:
        imported = sorted(m for m in sys.modules if m.split(".")[0] == "wandb")
        with open(f"{path}.{os.getpid()}", "w") as f:
            f.write("\n".join(imported))

    atexit.register(record)


if any(_env(n) for n in _PRODUCT_FAULTS):
    try:
        _install_product_faults()
    except Exception as e:
        # Python would print an error from sitecustomize and run on without the faults: a test
        # would then pass or fail for the wrong reason. Stop the process instead.
        sys.stderr.write(f"tests/faults/sitecustomize.py: cannot install the faults: {e!r}\n")
        os._exit(70)
if _env("HIDE_MODULES"):
    _hide_modules(_env("HIDE_MODULES").split(","))
if _env("RECORD_WANDB_IMPORT"):
    _record_wandb_import(_env("RECORD_WANDB_IMPORT"))
