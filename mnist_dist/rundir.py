"""The run directory: resolved config with provenance, per-epoch and per-step records, summary."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mnist_dist.errors import UsageError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"


def resolve_run_dir(accelerator: Accelerator, output_dir: str | None) -> Path:
    """The run directory, the same on every rank (a default timestamp is chosen on the main
    process and broadcast). Refuses a directory that already holds a run's records."""
    choice = [output_dir or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    path = Path(choice[0])
    if (path / METRICS_FILE).exists():
        raise UsageError(
            f"{path} already holds a run ({METRICS_FILE} exists); choose another --output-dir"
        )
    return path


class RunDir:
    """Writes a run's records; a no-op on every rank but the main process."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UsageError(
                    f"cannot write to output directory {path}: {e.strerror or e}"
                ) from None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

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
            with open(self.path / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _write_atomic(self, name: str, text: str) -> None:
        partial = self.path / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, self.path / name)
