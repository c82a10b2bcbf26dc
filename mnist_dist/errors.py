"""The exceptions the command line turns into one line on stderr, and its exit codes."""

import shutil
from pathlib import Path

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 4
EXIT_STOPPED = 75  # EX_TEMPFAIL, "try again later": resumable with --resume auto
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells say


class MnistDistError(Exception):
    """An error whose message is complete on its own line; the command exits with exit_code."""

    exit_code = 1
    label = "error"  # printed as "mnist-dist: <label>: <message>"


class UsageError(MnistDistError):
    """Bad input: a flag, a config file, a dataset, a weights file or a checkpoint."""

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
    """The first line of an exception's message, or its type name when the message is empty."""
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
