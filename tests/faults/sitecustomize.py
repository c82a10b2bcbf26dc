"""Faults the tracking tests inject into a child ``mnist-dist`` process (never imported by the
package or by pytest itself): put this folder on the child's PYTHONPATH and set

- ``FAULT_WANDB_LOG_RAISES_AFTER=N``: W&B's ``Run.log`` raises ``OSError(ENOSPC)`` from its
  N+1-th call on, as when the disk holding the run fills up;
- ``FAULT_WANDB_FINISH_SLEEPS=S``: W&B's ``Run.finish`` sleeps S seconds first, as when an upload
  hangs on a dead network;
- ``FAULT_HIDE_MODULES=a,b``: importing those top-level modules fails as if not installed;
- ``FAULT_RECORD_WANDB_IMPORT=PATH``: at exit, write to PATH the wandb modules that were imported.
"""

import atexit
import errno
import importlib.abc
import os
import sys
import time

if os.environ.get("FAULT_WANDB_LOG_RAISES_AFTER") or os.environ.get("FAULT_WANDB_FINISH_SLEEPS"):
    from wandb.sdk import wandb_run

    _log, _finish, _calls = wandb_run.Run.log, wandb_run.Run.finish, [0]
    _after = int(os.environ.get("FAULT_WANDB_LOG_RAISES_AFTER") or 10**9)
    _sleep = float(os.environ.get("FAULT_WANDB_FINISH_SLEEPS") or 0)

    def log(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] > _after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return _log(self, *args, **kwargs)

    def finish(self, *args, **kwargs):
        time.sleep(_sleep)
        return _finish(self, *args, **kwargs)

    wandb_run.Run.log, wandb_run.Run.finish = log, finish


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


if os.environ.get("FAULT_HIDE_MODULES"):
    sys.meta_path.insert(0, _Hide(os.environ["FAULT_HIDE_MODULES"].split(",")))

if os.environ.get("FAULT_RECORD_WANDB_IMPORT"):

    def _record(path=os.environ["FAULT_RECORD_WANDB_IMPORT"]):
        imported = sorted(m for m in sys.modules if m.split(".")[0] == "wandb")
        with open(f"{path}.{os.getpid()}", "w") as f:
            f.write("\n".join(imported))

    atexit.register(_record)
