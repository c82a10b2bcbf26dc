"""What a run shows: the console on the main process, and the experiment tracker.

Only the main process prints or logs; every other rank gets the silent implementations.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mnist_dist.rundir import RunDir

EPOCH_COLUMNS = (
    ("epoch", "epoch", "{}"),
    ("lr", "lr", "{:.1e}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("train acc", "train_accuracy", "{:.2%}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("seconds", "epoch_seconds", "{:.1f}"),
    ("images/s", "images_per_second", "{:,.0f}"),
)


def format_epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One plain line per epoch, for logs that are not terminals (SLURM, CI)."""
    return (
        f"epoch {record['epoch']}/{epochs}"
        f"  lr {record['lr']:.1e}"
        f"  train_loss {record['train_loss']:.4f}  train_acc {record['train_accuracy']:.2%}"
        f"  test_loss {record['test_loss']:.4f}  test_acc {record['test_accuracy']:.2%}"
        f" ({record['test_correct']}/{record['test_total']})"
        f"  {record['epoch_seconds']:.1f}s  {record['images_per_second']:,.0f} images/s"
    )


class RunConsole:
    """Progress and per-epoch results on the main process; silent elsewhere.

    On a terminal: a rich progress bar (steps, loss, images/s, ETA) under a growing epoch
    table. Otherwise (log files, pipes): one plain line per epoch and no redrawn bars.
    """

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int) -> None:
        self.enabled, self.epochs, self.steps_per_epoch = enabled, epochs, steps_per_epoch
        self.console = Console(file=sys.stdout)
        self.interactive = enabled and self.console.is_terminal
        self._live: Live | None = None
        if self.interactive:
            self.table = Table(title="mnist-dist", title_justify="left")
            for title, _, _ in EPOCH_COLUMNS:
                self.table.add_column(title, justify="right")
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self.progress.add_task(
                "train", total=steps_per_epoch, epoch=0, epochs=epochs, loss="-", ips="-"
            )
            self._live = Live(Group(self.table, self.progress), console=self.console)
            self._live.start()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start_epoch(self, epoch: int, completed: int = 0) -> None:
        if self.interactive:
            self.progress.reset(self._task, total=self.steps_per_epoch, completed=completed)
            self.progress.update(self._task, epoch=epoch, loss="-", ips="-")

    def advance(self, steps: int = 1) -> None:
        if self.interactive:
            self.progress.advance(self._task, steps)

    def show_step(self, loss: float, images_per_second: float) -> None:
        if self.interactive:
            self.progress.update(self._task, loss=f"{loss:.4f}", ips=f"{images_per_second:,.0f}")

    def end_epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.table.add_row(*(fmt.format(record[key]) for _, key, fmt in EPOCH_COLUMNS))
        else:
            print(format_epoch_line(record, self.epochs), flush=True)

    def close(self) -> None:
        if self._live is not None:
            self.progress.update(self._task, visible=False)
            self._live.stop()
            self._live = None


class Tracker(Protocol):
    """What the training loop needs from an experiment tracker."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self) -> None: ...


class NoTracker:
    """``--tracker none`` and every non-main rank: no calls to any tracking library."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """W&B through Accelerate's tracker API, started on the main process only.

    Offline unless credentials are present (compute nodes usually have no internet); tracking
    problems disable tracking with one warning and never end the training run.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        config: dict[str, Any],
        warn: Callable[[str], None],
    ) -> None:
        self.accelerator, self.warn, self.active = accelerator, warn, False
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        try:
            accelerator.init_trackers(
                project_name=os.environ.get("WANDB_PROJECT", "mnist-dist"),
                config=config,
                init_kwargs={"wandb": {"dir": str(run_dir), "mode": mode}},
            )
            self.active = True
        except Exception as e:  # tracking must never end a training run
            self._disable(e)

    def _disable(self, error: Exception) -> None:
        self.active = False
        self.warn(
            f"warning: W&B tracking stopped ({type(error).__name__}: {error}); training goes on"
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.active:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as e:
                self._disable(e)

    def finish(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which every
        # rank does at the very end of a run.
        if self.active:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as e:
                self._disable(e)
            self.accelerator.trackers = []
            self.active = False


def make_tracker(
    kind: str,
    accelerator: Accelerator,
    run_dir: Path,
    config: dict[str, Any],
    warn: Callable[[str], None],
) -> Tracker:
    """W&B on the main process for ``--tracker wandb``; otherwise a tracker that does nothing."""
    if kind == "wandb" and accelerator.is_main_process:
        return WandbTracker(accelerator, run_dir, config, warn)
    return NoTracker()


@dataclass
class RunOutputs:
    """Everywhere a run's records go: its files, the tracker and the console."""

    files: RunDir
    tracker: Tracker
    console: RunConsole

    def record_step(self, record: dict[str, Any]) -> None:
        self.files.append_step(record)
        self.tracker.log({f"train/{k}": v for k, v in record.items()}, step=record["global_step"])
        self.console.show_step(record["train_loss"], record["images_per_second"])

    def record_epoch(self, record: dict[str, Any]) -> None:
        self.files.append_epoch(record)
        self.tracker.log({f"epoch/{k}": v for k, v in record.items()}, step=record["global_step"])
        self.console.end_epoch(record)
