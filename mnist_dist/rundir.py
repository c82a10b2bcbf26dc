"""The run directory: resolved config with provenance, per-epoch and per-step records, summary."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mnist_dist.errors import UsageError, WriteError
from mnist_dist.layout import (
    CONFIG_FILE,
    METRICS_FILE,
    RUNS_DIR,
    STATUS_FILE,
    STEPS_FILE,
    SUMMARY_FILE,
    RunLayout,
    parse_resume,
    partial_file,
    run_dir_of,
)
from mnist_dist.records import EpochRecord, StepRecord, Summary

# The records a writer takes: typed, or (until every producer builds them) their dicts.
AnyRecord = StepRecord | EpochRecord | Summary | dict[str, Any]


def resolve_run_dir(accelerator: Accelerator, output_dir: str | None, resume: str) -> Path:
    """The run directory, the same on every rank: ``--output-dir``; else the run a
    ``--resume PATH`` checkpoint belongs to; else ``runs/<timestamp>`` chosen on the main
    process and broadcast."""
    if output_dir:
        return Path(output_dir)
    checkpoint = parse_resume(resume).path
    if checkpoint is not None:
        return run_dir_of(checkpoint)
    choice = [f"{RUNS_DIR}/{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    return Path(choice[0])


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's config.yaml (settings and provenance), or None if it has none."""
    try:
        config = yaml.safe_load(RunLayout(run_dir).config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it; raises ``OSError``.
    The probe's name is unique per host and process: several nodes may probe one shared
    folder at once."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
    probe.write_text("")
    probe.unlink()


def check_output_dir(path: Path) -> None:
    """``check_writable`` for a run directory: a failure is a one-line ``UsageError``."""
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"cannot write to output directory {path}: {e.strerror or e}") from None


class RunDir:
    """Writes a run's records, in the files ``layout`` names; a no-op on every rank but the
    main process. The writers take the typed records of ``records`` or the same records as
    plain dicts (written as given)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.layout = RunLayout(path)
        if enabled:
            check_output_dir(path)

    @property
    def model_path(self) -> Path:
        return self.layout.model

    @property
    def summary_path(self) -> Path:
        return self.layout.summary

    def holds_records(self) -> bool:
        """Whether a run already wrote epoch records here."""
        return self.layout.metrics.exists()

    def finished_summary(self) -> Summary | None:
        """The summary of the finished run this directory holds, or None if it holds none."""
        try:
            status = json.loads(self.layout.status.read_text())
            finished = isinstance(status, dict) and status.get("state") == "finished"
            return (
                Summary.from_dict(json.loads(self.layout.summary.read_text())) if finished else None
            )
        except (OSError, ValueError):  # RecordError is a ValueError
            return None

    def restore_records(
        self, history: list[EpochRecord] | list[dict[str, Any]], global_step: int
    ) -> None:
        """Rewind the records to a checkpoint: its epoch history, and the step records up to
        its global step (a resumed run repeats the steps after it)."""
        if not self.enabled:
            return
        self._write_atomic(METRICS_FILE, "".join(_json_line(r) for r in history))
        steps = self.layout.steps
        if steps.exists():
            kept = [
                line + "\n"
                for line in steps.read_text().splitlines()
                if line.strip() and json.loads(line)["global_step"] <= global_step
            ]
            self._write_atomic(STEPS_FILE, "".join(kept))

    def write_status(self, state: str, **details: Any) -> None:
        """``status.json``: running, finished, stopped (resumable), diverged or failed, for
        schedulers and scripts that cannot read exit codes through a launcher."""
        # Best effort: a full disk must not hide the error that ended the run.
        if self.enabled:
            with contextlib.suppress(WriteError):
                self._write_atomic(STATUS_FILE, json.dumps({"state": state, **details}) + "\n")

    def write_config(self, config: dict[str, Any], provenance: dict[str, Any]) -> None:
        if self.enabled:
            text = yaml.safe_dump({**config, "provenance": provenance}, sort_keys=False)
            self._write_atomic(CONFIG_FILE, text)

    def append_epoch(self, record: EpochRecord | dict[str, Any]) -> None:
        self._append(METRICS_FILE, record)

    def append_step(self, record: StepRecord | dict[str, Any]) -> None:
        self._append(STEPS_FILE, record)

    def write_summary(self, summary: Summary | dict[str, Any]) -> None:
        if self.enabled:
            self._write_atomic(SUMMARY_FILE, json.dumps(_plain(summary), indent=2) + "\n")

    def _append(self, name: str, record: AnyRecord) -> None:
        if self.enabled:
            try:
                with open(self.path / name, "a") as f:
                    f.write(_json_line(record))
            except OSError as e:
                raise WriteError(f"cannot write {self.path / name}: {e.strerror or e}") from None

    def _write_atomic(self, name: str, text: str) -> None:
        """Replace ``name`` with ``text`` in one rename: a failed write leaves the old file
        as it was, and no partial file behind."""
        final = self.path / name
        partial = partial_file(final)
        try:
            partial.write_text(text)
            os.replace(partial, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)  # may hold the last free bytes of a full disk
            raise WriteError(f"cannot write {final}: {e.strerror or e}") from None


def _plain(record: AnyRecord) -> dict[str, Any]:
    return record if isinstance(record, dict) else record.to_dict()


def _json_line(record: AnyRecord) -> str:
    return json.dumps(_plain(record)) + "\n"
