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

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
STATUS_FILE = "status.json"


def resolve_run_dir(accelerator: Accelerator, output_dir: str | None, resume: str) -> Path:
    """The run directory, the same on every rank: ``--output-dir``; else the run a
    ``--resume PATH`` checkpoint belongs to; else ``runs/<timestamp>`` chosen on the main
    process and broadcast."""
    if output_dir:
        return Path(output_dir)
    if resume not in ("auto", "never"):
        return Path(resume).parent.parent  # <run dir>/checkpoints/<checkpoint>
    choice = [f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    return Path(choice[0])


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's config.yaml (settings and provenance), or None if it has none."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
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
    """Writes a run's records; a no-op on every rank but the main process."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            check_output_dir(path)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    def holds_records(self) -> bool:
        """Whether a run already wrote epoch records here."""
        return (self.path / METRICS_FILE).exists()

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of the finished run this directory holds, or None if it holds none."""
        try:
            status = json.loads((self.path / STATUS_FILE).read_text())
            summary = json.loads((self.path / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return None
        finished = isinstance(status, dict) and status.get("state") == "finished"
        return summary if finished and isinstance(summary, dict) else None

    def restore_records(self, history: list[dict[str, Any]], global_step: int) -> None:
        """Rewind the records to a checkpoint: its epoch history, and the step records up to
        its global step (a resumed run repeats the steps after it)."""
        if not self.enabled:
            return
        self._write_atomic(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        steps = self.path / STEPS_FILE
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

    def append_epoch(self, record: dict[str, Any]) -> None:
        self._append(METRICS_FILE, record)

    def append_step(self, record: dict[str, Any]) -> None:
        self._append(STEPS_FILE, record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            self._write_atomic(SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.enabled:
            try:
                with open(self.path / name, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise WriteError(f"cannot write {self.path / name}: {e.strerror or e}") from None

    def _write_atomic(self, name: str, text: str) -> None:
        partial = self.path / f".{name}.partial"
        try:
            partial.write_text(text)
            os.replace(partial, self.path / name)
        except OSError as e:
            raise WriteError(f"cannot write {self.path / name}: {e.strerror or e}") from None
