"""The run directory: resolved config with provenance, per-epoch and per-step records, summary."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mnist_dist import claim
from mnist_dist.claim import HEARTBEAT_SECONDS, ClaimLost, Holder
from mnist_dist.distributed import say
from mnist_dist.errors import UsageError, WriteError
from mnist_dist.layout import RUNS_DIR, RunLayout, parse_resume, partial_file, run_dir_of
from mnist_dist.records import EpochRecord, StepRecord, Summary

AnyRecord = StepRecord | EpochRecord | Summary | dict[str, Any]


def resolve_run_dir(accelerator: Accelerator, output_dir: str | None, resume: str) -> RunLayout:
    """The run directory, the same on every rank: ``--output-dir``, else the run of a
    ``--resume PATH`` checkpoint, else a new ``runs/<timestamp>``."""
    if not output_dir and (checkpoint := parse_resume(resume).path) is not None:
        output_dir = str(run_dir_of(checkpoint))
    elif not output_dir:
        choice = [f"{RUNS_DIR}/{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
        if accelerator.num_processes > 1:
            broadcast_object_list(choice)
        output_dir = choice[0]
    return RunLayout(Path(output_dir))


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it; raises ``OSError``."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"  # nodes may share it
    probe.write_text("")
    probe.unlink()


def check_output_dir(path: Path) -> None:
    """``check_writable`` for a run directory: a failure is a one-line ``UsageError``."""
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"cannot write to output directory {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def claimed(accelerator: Accelerator, layout: RunLayout) -> Iterator[Holder | None]:
    """Hold the run directory while the block runs; yields the claim on the main process (None
    elsewhere). Every rank refuses before anything is written, and leaves no empty folder."""
    me = Holder.this_process() if accelerator.is_main_process else None
    path = layout.root
    created = [p for p in (path, *path.parents) if not p.exists()]
    outcome: list[str | None] = [None, None]  # refusal, warning
    if me is not None:
        try:
            check_output_dir(path)
            outcome[1] = claim.acquire(layout, me)
        except UsageError as e:
            outcome[0] = str(e)
        except OSError as e:  # a disk that fills after the probe
            outcome[0] = f"cannot claim {path}: {e.strerror or e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    try:
        if outcome[0] is not None:
            raise UsageError(outcome[0])
        if outcome[1] is not None:
            say(outcome[1])
        yield me
    finally:
        if me is not None:
            claim.release(layout, me)
            with contextlib.suppress(OSError):
                for folder in created:  # deepest first, while empty
                    folder.rmdir()


@dataclass
class RunDir:
    """Writes a run's records (typed, or dicts) on the main process; a no-op on the others."""

    layout: RunLayout
    enabled: bool
    holder: Holder | None = None  # the claim, whose token every status.json carries
    command: str | None = None  # the command that continues the run
    position: dict[str, Any] = field(default_factory=dict)  # epoch, step, global_step, checkpoint
    _next_beat: float = 0.0  # time.monotonic() of the next heartbeat the loop owes

    @property
    def path(self) -> Path:
        return self.layout.root

    def finished_summary(self) -> Summary | None:
        """The summary of the finished run this directory holds, or None if it holds none."""
        with contextlib.suppress(OSError, ValueError):  # RecordError is a ValueError
            status = json.loads(self.layout.status.read_text())
            if isinstance(status, dict) and status.get("state") == "finished":
                return Summary.from_dict(json.loads(self.layout.summary.read_text()))
        return None

    def restore_records(self, history: Sequence[AnyRecord], global_step: int) -> None:
        """Rewind the records to a checkpoint's epoch history and global step."""
        if not self.enabled:
            return
        self._write_atomic(self.layout.metrics, "".join(_json_line(r) for r in history))
        steps = self.layout.steps
        if steps.exists():
            kept = [
                line + "\n"
                for line in steps.read_text().splitlines()
                if line.strip() and json.loads(line)["global_step"] <= global_step
            ]
            self._write_atomic(steps, "".join(kept))

    def write_status(self, state: str, **details: Any) -> None:
        """``status.json``; best effort: a full disk must not hide the error that ended the run."""
        if self.enabled:
            # A finished run's position is its epoch count (details), not the next epoch.
            reached = {
                k: v for k, v in self.position.items() if state != "finished" or k == "checkpoint"
            }
            status = {"state": state, **reached, **details, "heartbeat": claim.utc_now()}
            if self.holder is not None:
                status["claim"] = self.holder.token
            if self.command is not None and state != "finished":
                status["continue"] = self.command
            with contextlib.suppress(WriteError):
                self._write_atomic(self.layout.status, json.dumps(status) + "\n")

    def beat(
        self, epoch: int, step: int, global_step: int, checkpoint: Path | None, force: bool = False
    ) -> None:
        """Status running at this position, at most every ``HEARTBEAT_SECONDS`` unless
        ``force``; ``ClaimLost`` when another training took the directory over."""
        now = time.monotonic()
        if not self.enabled or (now < self._next_beat and not force):
            return
        self._next_beat = now + HEARTBEAT_SECONDS
        if self.holder is not None and (taker := claim.lost_to(self.layout, self.holder)):
            raise ClaimLost(
                f"{self.path} was taken over by another training ({taker}) while this one "
                "showed no sign of life; stopping without writing anything more there"
            )
        where = {"epoch": epoch, "step": step, "global_step": global_step}
        self.position = {**where, "checkpoint": None if checkpoint is None else str(checkpoint)}
        self.write_status("running")

    def write_config(self, config: dict[str, Any], provenance: dict[str, Any]) -> None:
        if self.enabled:
            text = yaml.safe_dump({**config, "provenance": provenance}, sort_keys=False)
            self._write_atomic(self.layout.config, text)

    def append_epoch(self, record: EpochRecord | dict[str, Any]) -> None:
        self._append(self.layout.metrics, record)

    def append_step(self, record: StepRecord | dict[str, Any]) -> None:
        self._append(self.layout.steps, record)

    def write_summary(self, summary: Summary | dict[str, Any]) -> None:
        if self.enabled:
            self._write_atomic(self.layout.summary, _json_line(summary, indent=2))

    def _append(self, path: Path, record: AnyRecord) -> None:
        if self.enabled:
            try:
                with open(path, "a") as f:
                    f.write(_json_line(record))
            except OSError as e:
                raise WriteError(f"cannot write {path}: {e.strerror or e}") from None

    def _write_atomic(self, final: Path, text: str) -> None:
        """Replace ``final`` with ``text``; a failed write leaves the old file and no other."""
        partial = partial_file(final)
        try:
            partial.write_text(text)
            os.replace(partial, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)  # may hold the last free bytes of a full disk
            raise WriteError(f"cannot write {final}: {e.strerror or e}") from None


def _json_line(record: AnyRecord, indent: int | None = None) -> str:
    plain = record if isinstance(record, dict) else record.to_dict()
    return json.dumps(plain, indent=indent) + "\n"
