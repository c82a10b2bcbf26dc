"""Fault injection for the subprocesses the tests start (never imported by mnist-dist itself).

A test puts this folder on PYTHONPATH and sets one of the variables below; Python imports this
module at start-up, in every process the launcher starts too. Without the variables it does
nothing.

- MNIST_DIST_FAULT_STEP_SLEEP=S   sleep S seconds in every optimizer step (time to send a
                                  signal mid-epoch)
- MNIST_DIST_FAULT_KILL_IN_SAVE=N SIGKILL this process in the N-th checkpoint save, after the
                                  model file is written and before the optimizer file
- MNIST_DIST_FAULT_NAN_AT_STEP=N  the training loss of the N-th training forward pass (counted
                                  in this process) becomes NaN
- MNIST_DIST_FAULT_ENOSPC_IN_SAVE=N the N-th checkpoint save fails with "No space left on device"
"""

import os

_SLEEP = float(os.environ.get("MNIST_DIST_FAULT_STEP_SLEEP", "0"))
_KILL_IN_SAVE = int(os.environ.get("MNIST_DIST_FAULT_KILL_IN_SAVE", "0"))
_NAN_AT_STEP = int(os.environ.get("MNIST_DIST_FAULT_NAN_AT_STEP", "0"))
_ENOSPC_IN_SAVE = int(os.environ.get("MNIST_DIST_FAULT_ENOSPC_IN_SAVE", "0"))


def _install() -> None:
    import errno
    import signal
    import time

    import torch

    if _SLEEP:
        original_step = torch.optim.Adam.step

        def slow_step(self, *args, **kwargs):
            time.sleep(_SLEEP)
            return original_step(self, *args, **kwargs)

        torch.optim.Adam.step = slow_step

    if _NAN_AT_STEP:
        import torch.nn.functional as F

        original_ce = F.cross_entropy
        calls = [0]

        def poisoned_ce(*args, **kwargs):
            loss = original_ce(*args, **kwargs)
            if torch.is_grad_enabled():  # training forward passes only
                calls[0] += 1
                if calls[0] == _NAN_AT_STEP:
                    loss = loss * float("nan")
            return loss

        F.cross_entropy = poisoned_ce

    if _KILL_IN_SAVE or _ENOSPC_IN_SAVE:
        import accelerate.checkpointing as checkpointing

        original_save = checkpointing.save
        saves = [0]

        def faulty_save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.bin"):  # written right after the model file
                saves[0] += 1
                if saves[0] == _KILL_IN_SAVE:
                    os.kill(os.getpid(), signal.SIGKILL)
                if saves[0] == _ENOSPC_IN_SAVE:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return original_save(obj, f, *args, **kwargs)

        checkpointing.save = faulty_save


if _SLEEP or _KILL_IN_SAVE or _NAN_AT_STEP or _ENOSPC_IN_SAVE:
    _install()
