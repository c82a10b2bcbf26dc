"""Who holds a run directory: the claim file one training's main process takes on it, and when
a claim left behind may be taken over (``judge``). A file rather than ``flock``: on NFS, locks
are not seen by every client of every cluster; a file is. Its heartbeat is in ``status.json``.
Anything ``judge`` does not allow is refused before the directory is touched; a holder whose
claim was taken over (a hung run that wakes up) stops at its next heartbeat (``ClaimLost``).
Standard library only: ``report`` and ``doctor`` read claims without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from mnist_dist.errors import EXIT_WRITE_FAILED, MnistDistError, UsageError
from mnist_dist.layout import RunLayout

HEARTBEAT_SECONDS = 60.0  # the longest the loop goes between heartbeats while it trains
STALE_SECONDS = 600.0  # silent this long: taken over (a margin too for node clocks that differ)


class ClaimLost(MnistDistError):
    """Another training took over this run's directory: stop without writing more there."""

    exit_code = EXIT_WRITE_FAILED


@dataclass(frozen=True)
class Holder:
    """The training that holds (or wants) a run directory."""

    host: str
    pid: int
    slurm_job: str | None  # SLURM_JOB_ID
    restart: int  # SLURM_RESTART_COUNT: 0, then one more at each requeue
    since: str  # when it claimed the directory (UTC, ISO 8601)
    token: str  # unique to this claim

    @classmethod
    def this_process(cls) -> Holder:
        job = os.environ.get("SLURM_JOB_ID") or None
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        return cls(socket.gethostname(), os.getpid(), job, restart, utc_now(), uuid.uuid4().hex)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seconds_since(stamp: str) -> float:
    """Seconds from an ISO 8601 time to now (inf for one that cannot be read)."""
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()
    except (TypeError, ValueError):
        return float("inf")


def read_holder(layout: RunLayout) -> Holder | None:
    """The claim's holder, or None if nobody holds it; ``UsageError`` for a file not a claim."""
    try:
        return Holder(**json.loads(layout.claim.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"{layout.claim} is not a readable claim ({e}); if no training uses "
            f"{layout.root}, delete it"
        ) from None


def last_sign_of_life(layout: RunLayout, holder: Holder) -> str:
    """``holder``'s heartbeat in ``status.json`` if the status is its own, else its claim time."""
    with contextlib.suppress(OSError, ValueError):
        status = json.loads(layout.status.read_text())
        if isinstance(status, dict) and status.get("claim") == holder.token:
            return max(holder.since, str(status.get("heartbeat") or holder.since))
    return holder.since


def _gone(holder: Holder) -> bool:
    """Whether ``holder`` ran on this host and its process has ended."""
    if holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: alive
            pass
    return False


def dead_because(layout: RunLayout, status: dict[str, Any]) -> str | None:
    """Why a run whose ``status.json`` says running is not, or None while it shows life."""
    try:
        holder = read_holder(layout)
    except UsageError:
        holder = None
    if holder is None or holder.token != status.get("claim"):
        return "no training holds the directory"
    if _gone(holder):
        return f"its process, pid {holder.pid} on {holder.host}, is gone"
    silent = seconds_since(last_sign_of_life(layout, holder))
    return f"no heartbeat for {silent / 60:.0f} min" if silent > STALE_SECONDS else None


def judge(layout: RunLayout, holder: Holder, me: Holder) -> str | None:
    """Why ``holder``'s claim may be taken over by ``me`` (a phrase), or None if it may not: its
    process on this host is gone, it is an earlier attempt of this SLURM job (SLURM ends every
    process of a job before it requeues it), or it was silent for ``STALE_SECONDS``."""
    same_job = bool(holder.slurm_job) and holder.slurm_job == me.slurm_job
    if same_job and (holder.host != me.host or holder.restart != me.restart):
        return f"an earlier attempt of SLURM job {holder.slurm_job} (requeued)"
    if _gone(holder):
        return "its process is gone"
    silent = seconds_since(last_sign_of_life(layout, holder))
    if silent > STALE_SECONDS:
        return f"no sign of life for {silent / 60:.0f} min (over {STALE_SECONDS / 60:.0f})"
    return None


def check(layout: RunLayout, me: Holder) -> str | None:
    """What ``acquire`` would do, without doing it: raise its refusal or return its warning."""
    holder = read_holder(layout)
    return None if holder is None else _take_over_warning(layout, holder, me)


def acquire(layout: RunLayout, me: Holder) -> str | None:
    """Claim the run directory for ``me``: a take-over's warning line, or None; ``UsageError``
    when another training holds it."""
    for _ in range(5):  # a claim released or moved while we look: look again
        if _link_claim(layout, me):
            return None
        holder = read_holder(layout)
        if holder is not None:
            warning = _take_over_warning(layout, holder, me)
            if _take_over(layout, holder, me) and _link_claim(layout, me):
                return warning
    raise UsageError(f"cannot claim {layout.root}: other trainings keep starting in it")


def _take_over_warning(layout: RunLayout, holder: Holder, me: Holder) -> str:
    why = judge(layout, holder, me)
    if why is None:
        raise UsageError(
            f"{layout.root} is in use by another training ({holder.describe()}; last sign of "
            f"life {last_sign_of_life(layout, holder)}): wait for it, stop it (touch "
            f"{layout.stop}), or choose another --output-dir"
        )
    held = f"a training that held it ({holder.describe()})"
    return f"warning: taking over {layout.root} from {held}: {why}"


def release(layout: RunLayout, me: Holder) -> None:
    """Give up ``me``'s claim (a claim someone else took over stays theirs)."""
    with contextlib.suppress(OSError, UsageError):
        if read_holder(layout) == me:
            layout.claim.unlink()


def lost_to(layout: RunLayout, me: Holder) -> str | None:
    """Who took ``me``'s claim over, in words, or None while it is still ``me``'s."""
    try:
        holder = read_holder(layout)
    except UsageError:
        return None  # damaged meanwhile: no proof that another training holds it
    if holder is None:
        return "nobody (its claim was removed)"
    return None if holder.token == me.token else holder.describe()


def _link_claim(layout: RunLayout, me: Holder) -> bool:
    """Create the claim for ``me`` if there is none. The NFS-safe O_EXCL of open(2): write a
    unique file, then ``link()`` it to the claim's name, so the claim appears whole."""
    claim = layout.claim
    unique = claim.with_name(f".{claim.name}.{me.host}.{me.pid}.{me.token[:8]}")
    unique.write_text(json.dumps(asdict(me)) + "\n")
    try:
        os.link(unique, claim)
        return True
    except FileExistsError:
        return False
    except OSError:
        return unique.stat().st_nlink == 2  # NFS: the reply was lost, the link was made
    finally:
        unique.unlink(missing_ok=True)


def _take_over(layout: RunLayout, stale: Holder, me: Holder) -> bool:
    """Move ``stale``'s claim out of the way. Two starts may judge one stale claim at once: a
    rename moves it only once, and one that moved someone else's claim instead puts it back."""
    claim = layout.claim
    moved = claim.with_name(f".{claim.name}.taken.{me.token[:8]}")
    try:
        os.rename(claim, moved)
    except FileNotFoundError:
        return True  # released meanwhile
    try:
        ours = stale.token in moved.read_text()
    except OSError:
        ours = True
    if not ours:
        with contextlib.suppress(OSError):
            os.link(moved, claim)  # never over a claim made meanwhile
    moved.unlink(missing_ok=True)
    return ours
