"""Who holds a run directory: the claim one training takes on it, and when a claim left behind
may be taken over. Standard library only: ``report`` and ``doctor`` read claims without torch.

Exactly one training (one job, all its ranks) writes to a run directory at a time. Its main
process holds the directory's claim file (``layout.CLAIM_FILE``), a small JSON record of the
holder: host, pid, SLURM job id and restart count, when it started, and a random token. The
run's heartbeat is in ``status.json`` (``heartbeat``, with the claim's token), refreshed by the
training loop; the claim itself is never rewritten.

Why a claim file and not a lock. ``flock``/``fcntl`` locks (what the ``filelock`` and
``fasteners`` packages use) vanish with their process, which is what we want, but on NFS they
depend on the lock manager or the NFSv4 lease of every client and are not seen by all of them
on every cluster; the checkpoint folders of Lightning and torchtitan are not guarded at all,
and a second job simply writes into them. A file that exists is seen by every node. It is
created the classic NFS-safe way (the open(2) manual's advice for O_EXCL on NFS): the record
is written to a file of a unique name, then ``link()``-ed to the claim's name, which fails if
the claim exists; a lost reply of a link that did succeed shows as a link count of 2. The
claim appears with its whole content at once, so a reader never sees half of one.

The price of a file is that nothing removes it when its holder dies, hence the rules for a
claim that is left behind (``judge``). It is taken over, with one warning line, when:

- the holder ran on this host and its pid is gone (a killed run on the same machine);
- the holder is an earlier attempt of this SLURM job (the same job id, from another host or
  with another restart count): SLURM ends every process of a job before it requeues it, so
  that holder is gone even though its node cannot be asked;
- it shows no sign of life for ``STALE_SECONDS``: no heartbeat in ``status.json`` (or, before
  the first one, no claim) that recent. Heartbeats come at every checkpoint and epoch end and
  every ``HEARTBEAT_SECONDS`` of training, so only a dead or hung run stays silent that long;
  the margin also covers clocks of different nodes that disagree by a minute or two.

Anything else is refused before the directory is written to or deleted from, in one line that
names the directory and the holder. A holder whose claim was taken over (a hung run that
wakes up) notices at its next heartbeat and stops without writing more (``ClaimLost``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mnist_dist.errors import MnistDistError, UsageError
from mnist_dist.layout import RunLayout

HEARTBEAT_SECONDS = 60.0  # the longest the loop goes between heartbeats while it trains
STALE_SECONDS = 600.0  # a claim without a sign of life for this long is taken over


class ClaimLost(MnistDistError):
    """Another training took over this run's directory (this one was silent too long): stop
    without writing anything more there."""

    exit_code = 4


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
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job=os.environ.get("SLURM_JOB_ID") or None,
            restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            since=utc_now(),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seconds_since(stamp: str, now: datetime | None = None) -> float:
    """Seconds from an ISO 8601 time to ``now`` (inf for one that cannot be read)."""
    try:
        then = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return float("inf")
    return ((now or datetime.now(timezone.utc)) - then).total_seconds()


def read_holder(run_dir: Path) -> Holder | None:
    """The holder of ``run_dir``'s claim, or None when nobody holds it. Raises ``UsageError``
    for a claim file that is not one."""
    path = RunLayout(run_dir).claim
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"{path} is not a readable claim ({e}); if no training uses {run_dir}, delete it"
        ) from None


def last_sign_of_life(run_dir: Path, holder: Holder) -> str:
    """The newest time ``holder`` showed it is alive: its heartbeat in ``status.json`` if the
    status is its own, else when it claimed the directory."""
    try:
        status = json.loads(RunLayout(run_dir).status.read_text())
    except (OSError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("claim") == holder.token:
        return max(holder.since, str(status.get("heartbeat") or holder.since))
    return holder.since


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dead_because(run_dir: Path, status: dict[str, Any]) -> str | None:
    """Why a run whose ``status.json`` says running is not running any more, or None while
    it shows signs of life: the claim it ran under is gone, its process on this host is
    gone, or it has been silent for ``STALE_SECONDS``."""
    try:
        holder = read_holder(run_dir)
    except UsageError:
        holder = None
    if holder is None or holder.token != status.get("claim"):
        return "no training holds the directory"
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return f"its process, pid {holder.pid} on {holder.host}, is gone"
    silent = seconds_since(last_sign_of_life(run_dir, holder))
    if silent > STALE_SECONDS:
        return f"no heartbeat for {silent / 60:.0f} min"
    return None


def judge(run_dir: Path, holder: Holder, me: Holder) -> str | None:
    """Why ``holder``'s claim may be taken over by ``me`` (a phrase), or None if it may not."""
    same_job = bool(holder.slurm_job) and holder.slurm_job == me.slurm_job
    if same_job and (holder.host != me.host or holder.restart != me.restart):
        return f"an earlier attempt of SLURM job {holder.slurm_job} (requeued)"
    if holder.host == me.host and not pid_alive(holder.pid):
        return "its process is gone"
    silent = seconds_since(last_sign_of_life(run_dir, holder))
    if silent > STALE_SECONDS:
        return f"no sign of life for {silent / 60:.0f} min (over {STALE_SECONDS / 60:.0f})"
    return None


def refusal(run_dir: Path, holder: Holder) -> UsageError:
    return UsageError(
        f"{run_dir} is in use by another training ({holder.describe()}; last sign of life "
        f"{last_sign_of_life(run_dir, holder)}): wait for it, stop it (touch "
        f"{RunLayout(run_dir).stop}), or choose another --output-dir"
    )


def check(run_dir: Path, me: Holder) -> str | None:
    """What ``acquire`` would do, without doing it: raises the refusal, or returns the warning
    of a take-over (None when the directory is free)."""
    holder = read_holder(run_dir)
    return None if holder is None else _take_over_warning(run_dir, holder, me)


def acquire(run_dir: Path, me: Holder) -> str | None:
    """Claim the existing folder ``run_dir`` for ``me``. Returns the warning line of a claim
    taken over (None otherwise); raises ``UsageError`` when another training holds it."""
    for _ in range(5):  # a claim released or moved while we look: look again
        if _link_claim(run_dir, me):
            return None
        holder = read_holder(run_dir)
        if holder is None:
            continue
        warning = _take_over_warning(run_dir, holder, me)
        if _take_over(run_dir, holder, me) and _link_claim(run_dir, me):
            return warning
    raise UsageError(f"cannot claim {run_dir}: other trainings keep starting in it")


def _take_over_warning(run_dir: Path, holder: Holder, me: Holder) -> str:
    """The warning line for taking ``holder``'s claim over; raises the refusal if it may not
    be."""
    why = judge(run_dir, holder, me)
    if why is None:
        raise refusal(run_dir, holder)
    held = f"a training that held it ({holder.describe()})"
    return f"warning: taking over {run_dir} from {held}: {why}"


def release(run_dir: Path, me: Holder) -> None:
    """Give up ``me``'s claim (a claim someone else took over stays theirs)."""
    with contextlib.suppress(OSError, UsageError):
        holder = read_holder(run_dir)
        if holder is not None and holder.token == me.token:
            RunLayout(run_dir).claim.unlink()


def lost_to(run_dir: Path, me: Holder) -> str | None:
    """Who took ``me``'s claim over, in words, or None while it is still ``me``'s."""
    try:
        holder = read_holder(run_dir)
    except UsageError:
        return None  # damaged meanwhile: no proof that another training holds it
    if holder is None:
        return "nobody (its claim was removed)"
    return None if holder.token == me.token else holder.describe()


def _link_claim(run_dir: Path, me: Holder) -> bool:
    """Create the claim for ``me`` if there is none: whole, in one ``link()``."""
    claim = RunLayout(run_dir).claim
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


def _take_over(run_dir: Path, stale: Holder, me: Holder) -> bool:
    """Move ``stale``'s claim out of the way. Two starts may judge one stale claim at once: a
    rename moves it only once, and the one that finds it moved someone else's fresh claim
    instead puts that one back."""
    claim = RunLayout(run_dir).claim
    moved = claim.with_name(f".{claim.name}.taken.{me.token[:8]}")
    try:
        os.rename(claim, moved)
    except FileNotFoundError:
        return True  # released meanwhile
    try:
        taken = Holder(**json.loads(moved.read_text()))
    except (OSError, ValueError, TypeError):
        taken = None
    if taken is None or taken.token == stale.token:
        moved.unlink(missing_ok=True)
        return True
    with contextlib.suppress(OSError):
        os.link(moved, claim)  # never over a claim made meanwhile
    moved.unlink(missing_ok=True)
    return False
