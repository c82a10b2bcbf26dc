"""What every rank of a launch needs: how long collectives wait, the command that continues."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from datetime import timedelta
from pathlib import Path

from mnist_dist.errors import UsageError

COLLECTIVE_TIMEOUT_ENV = "MNIST_DIST_COLLECTIVE_TIMEOUT"


def collective_timeout() -> timedelta | None:
    """``MNIST_DIST_COLLECTIVE_TIMEOUT`` (seconds): how long a rank waits in a collective or at
    the rendezvous for a peer that vanished without closing its connections (a dead node, a cut
    network; a peer that exits is noticed at once). None: PyTorch's default (30 min for gloo)."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?", value) or float(value) <= 0:
        raise UsageError(f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return timedelta(seconds=float(value))


def continue_command(run_dir: Path, resume_auto: bool) -> str:
    """The command that continues this run, shell-quoted: the one the user ran (the launcher's
    under ``accelerate launch``; a resubmission of ``slurm/train.sbatch`` in its jobs) with
    ``--output-dir run_dir`` (in the form the user gave) and, where asked, ``--resume auto``."""
    prefix, args = _invocation()
    args = _with_option(args, "--output-dir", str(run_dir))
    if resume_auto:
        args = _with_option(args, "--resume", "auto")
    return shlex.join([*prefix, *args])


def _invocation() -> tuple[list[str], list[str]]:
    """(the words that started mnist-dist, as typed; the sub-command and its arguments)."""
    args = sys.argv[1:]
    # slurm/train.sbatch exports the plan doctor wrote (MNIST_DIST_RUN_DIR among it) to the
    # ranks: a job of that script continues by a resubmission, not by a node's own command.
    in_sbatch_job = os.environ.get("SLURM_JOB_ID") and os.environ.get("MNIST_DIST_RUN_DIR")
    if in_sbatch_job and args[:1] == ["train"]:
        return ["sbatch", "slurm/train.sbatch"], args[1:]
    # A rank of accelerate launch / torchrun: its launcher's argv first, then its own (Linux).
    pids = [os.getppid(), os.getpid()] if "LOCAL_RANK" in os.environ else [os.getpid()]
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if args and argv.split("\0")[-len(args) - 1 : -1] == args:
            return _as_typed(argv.split("\0")[: -len(args) - 1]), args
    if Path(sys.argv[0]).name == "__main__.py":
        return [sys.executable, "-m", "mnist_dist"], args
    return _as_typed([sys.executable, sys.argv[0]]), args


def _as_typed(prefix: list[str]) -> list[str]:
    """A script started through its ``#!`` line shows as ``python /path/to/script``: the
    script's name alone when it is the one on PATH (``mnist-dist``, ``accelerate``)."""
    if len(prefix) >= 2 and Path(prefix[0]).name.startswith("python"):
        script = prefix[1]
        if not script.startswith("-") and Path(script).is_file():
            found = shutil.which(Path(script).name)
            same = found is not None and Path(found).resolve() == Path(script).resolve()
            return [Path(script).name if same else script, *prefix[2:]]
    return prefix


def _with_option(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag value`` in place of every ``flag X`` / ``flag=X``, or at the end."""
    out, given, i = [], False, 0
    while i < len(args):
        word = args[i]
        if word == flag or word.startswith(flag + "="):
            if not given:
                out += [flag, value]
            given = True
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    return out if given else [*out, flag, value]
