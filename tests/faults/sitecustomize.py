"""Fault injection for the subprocesses the tests start (never imported by mnist-dist itself).

A test puts this folder on the child's PYTHONPATH (``helpers.fault_env``) and sets variables
below; Python imports this module at start-up, in every process a launcher starts too. Without
the variables it does nothing.

Training and checkpoints:
- MNIST_DIST_FAULT_STEP_SLEEP=S      sleep S seconds in every optimizer step (time to send a
                                     signal mid-epoch)
- MNIST_DIST_FAULT_KILL_IN_SAVE=N    SIGKILL this process in the N-th checkpoint save, after the
                                     model file is written and before the optimizer file
- MNIST_DIST_FAULT_ENOSPC_IN_SAVE=N  the N-th checkpoint save fails with "No space left on device"
- MNIST_DIST_FAULT_EVAL_SLEEP=S      sleep S seconds in every evaluation batch (a loss computed
                                     without gradients)
- MNIST_DIST_FAULT_NAN_AT_STEP=N     the training loss of the N-th training forward pass (counted
                                     in this process) becomes NaN
W&B:
- MNIST_DIST_FAULT_WANDB_LOG_RAISES_AFTER=N  W&B's ``Run.log`` raises ``OSError(ENOSPC)`` from its
                                     N+1-th call on, as when the disk holding the run fills up
- MNIST_DIST_FAULT_WANDB_FINISH_SLEEPS=S     W&B's ``Run.finish`` sleeps S seconds first, as when
                                     an upload hangs on a dead network
Imports:
- MNIST_DIST_FAULT_HIDE_MODULES=a,b  importing those top-level modules fails as if not installed
- MNIST_DIST_FAULT_RECORD_WANDB_IMPORT=PATH  at exit, write to PATH.<pid> the wandb modules that
                                     were imported
"""

import os


def _env(name: str) -> str:
    return os.environ.get(f"MNIST_DIST_FAULT_{name}", "")


def _install_training_faults() -> None:
    import errno
    import signal
    import time

    import torch

    sleep, nan_at = float(_env("STEP_SLEEP") or 0), int(_env("NAN_AT_STEP") or 0)
    eval_sleep = float(_env("EVAL_SLEEP") or 0)
    kill_in, enospc_in = int(_env("KILL_IN_SAVE") or 0), int(_env("ENOSPC_IN_SAVE") or 0)

    if sleep:
        original_step = torch.optim.Adam.step

        def slow_step(self, *args, **kwargs):
            time.sleep(sleep)
            return original_step(self, *args, **kwargs)

        torch.optim.Adam.step = slow_step

    if eval_sleep or nan_at:
        import torch.nn.functional as F

        original_ce, training_calls = F.cross_entropy, [0]

        def faulty_ce(*args, **kwargs):
            if not torch.is_grad_enabled():  # an evaluation batch
                if eval_sleep:
                    time.sleep(eval_sleep)
                return original_ce(*args, **kwargs)
            loss = original_ce(*args, **kwargs)  # a training forward pass
            training_calls[0] += 1
            if training_calls[0] == nan_at:
                loss = loss * float("nan")
            return loss

        F.cross_entropy = faulty_ce

    if kill_in or enospc_in:
        import accelerate.checkpointing as checkpointing

        original_save, saves = checkpointing.save, [0]

        def faulty_save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.bin"):  # written right after the model file
                saves[0] += 1
                if saves[0] == kill_in:
                    os.kill(os.getpid(), signal.SIGKILL)
                if saves[0] == enospc_in:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return original_save(obj, f, *args, **kwargs)

        checkpointing.save = faulty_save


def _install_wandb_faults() -> None:
    import errno
    import time

    from wandb.sdk import wandb_run

    original_log, original_finish, calls = wandb_run.Run.log, wandb_run.Run.finish, [0]
    after = int(_env("WANDB_LOG_RAISES_AFTER") or 10**9)
    sleep = float(_env("WANDB_FINISH_SLEEPS") or 0)

    def log(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_log(self, *args, **kwargs)

    def finish(self, *args, **kwargs):
        time.sleep(sleep)
        return original_finish(self, *args, **kwargs)

    wandb_run.Run.log, wandb_run.Run.finish = log, finish


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


if any(
    _env(n) for n in ("STEP_SLEEP", "EVAL_SLEEP", "NAN_AT_STEP", "KILL_IN_SAVE", "ENOSPC_IN_SAVE")
):
    _install_training_faults()
if _env("WANDB_LOG_RAISES_AFTER") or _env("WANDB_FINISH_SLEEPS"):
    _install_wandb_faults()
if _env("HIDE_MODULES"):
    _hide_modules(_env("HIDE_MODULES").split(","))
if _env("RECORD_WANDB_IMPORT"):
    _record_wandb_import(_env("RECORD_WANDB_IMPORT"))
