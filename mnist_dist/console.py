"""The console on the main process: a rich progress bar and epoch table, or plain lines."""

from __future__ import annotations

import sys
import time
from typing import Any

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

from mnist_dist.config import TrainConfig
from mnist_dist.report import EPOCH_COLUMNS

# In a log (not a terminal) a progress line comes every progress_every seconds, and at each
# quarter of an epoch once a sixth of that has passed: timed like tqdm's mininterval.
MILESTONES = 4
MILESTONE_GAP = 1 / 6


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


def clock(seconds: float) -> str:
    """``H:MM:SS``, as the bar shows times."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunConsole:
    """Progress and per-epoch results on the main process; silent elsewhere. On a terminal:
    a status line, then bars for the epoch and the run under an epoch table; otherwise lines."""

    def __init__(self, enabled: bool, training: TrainConfig, steps_per_epoch: int) -> None:
        self.enabled, self.epochs, self.steps_per_epoch = enabled, training.epochs, steps_per_epoch
        self.progress_every = training.progress_every
        self.global_batch_size = training.global_batch_size
        self.console = Console(file=sys.stdout)
        self.interactive = enabled and self.console.is_terminal
        self._live: Live | None = None
        # Where training is, for the plain progress lines.
        self._epoch, self._step, self._loss = 0, 0, ""
        self._epoch_clock: tuple[float, int] = (0.0, 0)  # (time, steps taken) at its start
        self._run_clock: tuple[float, int] | None = None  # the same for this process's run
        self._last_line = time.monotonic()
        if self.interactive:
            self.table = Table(title="mnist-dist", title_justify="left")
            for title, _, _ in EPOCH_COLUMNS:
                self.table.add_column(title, justify="right")
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[details]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self.progress.add_task(
                "starting…", total=steps_per_epoch, details="", start=False
            )
            self._run_task = self.progress.add_task(
                "whole run", total=self.epochs * steps_per_epoch, details="", start=False
            )
            self._live = Live(Group(self.table, self.progress), console=self.console)
            self._live.start()

    def status(self, text: str) -> None:
        """Say what the run is doing before its first step (on a terminal: in the bar)."""
        if self._live is not None:
            self.progress.update(self._task, description=f"{text}…")
            self._live.refresh()  # now: each of these steps may take less than a redraw

    def start_epoch(self, epoch: int, completed: int = 0) -> None:
        now = time.monotonic()
        self._epoch, self._step = epoch, completed
        self._epoch_clock = (now, completed)
        done = (epoch - 1) * self.steps_per_epoch + completed
        if self._run_clock is None:  # the first epoch this process trains
            self._run_clock = (now, done)
        if self.interactive:
            self.progress.reset(self._task, total=self.steps_per_epoch, completed=completed)
            self.progress.update(self._task, description=f"epoch {epoch}/{self.epochs}", details="")
            if not self.progress.tasks[self._run_task].started:
                self.progress.update(self._run_task, completed=done)
                self.progress.start_task(self._run_task)
            self._live.refresh()  # every epoch's bar is drawn, however short the epoch

    def advance(self) -> None:
        self._step += 1
        if self.interactive:
            self.progress.advance(self._task, 1)
            self.progress.advance(self._run_task, 1)
        elif self.enabled and self.progress_every > 0 and self._step < self.steps_per_epoch:
            now = time.monotonic()
            since = now - self._last_line
            quarter = MILESTONES * self._step // self.steps_per_epoch
            passed_milestone = quarter > MILESTONES * (self._step - 1) // self.steps_per_epoch
            if since >= self.progress_every or (
                passed_milestone and since >= self.progress_every * MILESTONE_GAP
            ):
                print(self.progress_line(now), flush=True)
                self._last_line = now

    def show_step(self, loss: float, images_per_second: float) -> None:
        self._loss = f"  loss {loss:.4f}"
        if self.interactive:
            details = f"loss {loss:.4f}  {images_per_second:,.0f} img/s"
            self.progress.update(self._task, details=details)

    def progress_line(self, now: float) -> str:
        """Where the epoch is, the newest loss, the epoch's speed, and the time left."""
        total, step = self.steps_per_epoch, self._step
        line = f"epoch {self._epoch}/{self.epochs}  step {step}/{total} ({step / total:.0%})"
        line += self._loss  # the newest step record's
        epoch_rate = _rate(self._epoch_clock, now, step)
        done = (self._epoch - 1) * total + step
        run_rate = _rate(self._run_clock or self._epoch_clock, now, done)  # evaluations included
        if epoch_rate and run_rate:
            left = self.epochs * total - done
            line += (
                f"  {epoch_rate * self.global_batch_size:,.0f} images/s"
                f"  ETA epoch {clock((total - step) / epoch_rate)}, run {clock(left / run_rate)}"
            )
        return line

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self.interactive:
            self._live.refresh()  # the epoch's last step, loss and img/s, however short it was
            self.table.add_row(*(fmt.format(record[key]) for _, key, fmt in EPOCH_COLUMNS))
        elif self.enabled:
            print(format_epoch_line(record, self.epochs), flush=True)
            self._last_line = time.monotonic()

    def close(self) -> None:
        if self._live is not None:
            self.progress.update(self._task, visible=False)
            self.progress.update(self._run_task, visible=False)
            self._live.stop()
            self._live = None


def _rate(start: tuple[float, int], now: float, steps: int) -> float | None:
    """Steps per second since ``start`` (a time and the steps taken by then), or None."""
    seconds, taken = now - start[0], steps - start[1]
    return taken / seconds if taken > 0 and seconds > 0 else None
