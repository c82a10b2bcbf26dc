"""The console on the main process: a rich progress bar and epoch table, or plain epoch lines."""

from __future__ import annotations

import sys
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

from mnist_dist.report import EPOCH_COLUMNS


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
