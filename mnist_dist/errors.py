"""The exceptions the command line turns into one line on stderr, and the exit codes it uses.

Exit codes (also in the README, whose table the tests check): 0 finished; 2 bad input (flags,
config, data, weights, checkpoints, a launch that formed the wrong world size, an output
directory that cannot be written when the run starts); 3 training diverged (non-finite loss);
4 a write failed during the run (disk full, a folder that became unwritable); 75 stopped cleanly
by a signal or stop file, resumable with ``--resume auto`` (75 is EX_TEMPFAIL: "try again
later"); 130 interrupted by a second Ctrl-C, without a checkpoint (128 + SIGINT, as shells say).
"""

import json
import os
import shutil
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 4
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class MnistDistError(Exception):
    """An error whose message is complete on its own (it names the flag or file and what is
    wrong); the command line prints it as a single line and exits with ``exit_code``."""

    exit_code = 1
    label = "error"  # printed as "mnist-dist: <label>: <message>"


class UsageError(MnistDistError):
    """Bad input from the user or the disk: a flag, a config file, a dataset, a weights file or
    a checkpoint."""

    exit_code = EXIT_USAGE


class DivergedError(MnistDistError):
    """The training loss became non-finite; the newest checkpoint is the last good state."""

    exit_code = EXIT_DIVERGED


class WriteError(MnistDistError):
    """Writing run state failed; what was already on disk is intact."""

    exit_code = EXIT_WRITE_FAILED


class Stopped(MnistDistError):
    """A stop signal or stop file ended the run at a step boundary, after a checkpoint."""

    exit_code = EXIT_STOPPED
    label = "stopped"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries add stack dumps and hints below it),
    or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_failure(error: Exception, folder: Path) -> str:
    """What went wrong with a write, in words (torch.save's errors do not name a full disk)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    reason = first_line(error)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None:
        free = shutil.disk_usage(existing).free
        if free < 16 << 20:
            return f"No space left on device ({free:,} bytes free; {reason})"
    return reason


def leave_for_launcher(line: str) -> None:
    """Hand the line that ends this process to the launcher that started it, if any.

    ``accelerate launch`` (torchrun's elastic agent) ends a failed run with its own traceback and
    a failure summary with a block per failed rank, the root cause's block last; without help
    each block says only "To enable traceback see: https://pytorch.org/docs/stable/elastic/
    errors.html". The agent gives every rank a file to write its error into
    (``TORCHELASTIC_ERROR_FILE``) and prints what it finds there, a JSON object
    ``{"message": str, "timestamp": int}``, in the rank's block instead: the summary then ends
    with the line. (torch's own ``record`` decorator would put the Python traceback there.) The
    launcher's exit status is unchanged: 1 for any failed rank.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:  # not under the elastic agent, or it keeps no logs ("" then)
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the line is on stderr already; the summary is a convenience
