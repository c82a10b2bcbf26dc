"""``mnist-dist report``: look at runs without W&B, from their run directories' records
(``metrics.jsonl``; ``status.json`` and ``steps.jsonl`` before the first epoch ends), and with
matplotlib draw their curves into a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mnist_dist import claim
from mnist_dist.errors import UsageError
from mnist_dist.layout import METRICS_FILE, STATUS_FILE, STEPS_FILE, RunLayout
from mnist_dist.records import EpochRecord, RecordError, StepRecord

# (header, record field, format) of each column of the per-epoch table.
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
# Side by side, each run shows these after the shared epoch column.
SIDE_BY_SIDE = tuple(
    c for c in EPOCH_COLUMNS if c[0] in ("lr", "train loss", "test loss", "test acc")
)
# A run that has not finished an epoch shows its newest step records.
STEP_COLUMNS = (
    ("global step", "global_step", "{}"),
    ("epoch", "epoch", "{}"),
    ("lr", "lr", "{:.1e}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("images/s", "images_per_second", "{:,.0f}"),
)
STEP_ROWS = 10
_R = TypeVar("_R", EpochRecord, StepRecord)


@dataclass
class RunRecords:
    """What a run directory tells: its epoch records, status and step records."""

    layout: RunLayout
    epochs: list[EpochRecord]
    status: dict[str, Any]  # status.json
    steps: list[StepRecord]  # steps.jsonl

    def state(self) -> str:
        """The run's state; "running" only while the run shows signs of life."""
        state = self.status.get("state")
        if state is None:
            return "state unknown (no status.json)"
        dead = state == "running" and claim.dead_because(self.layout, self.status)
        return f"not running ({dead})" if dead else str(state)

    def state_lines(self) -> list[str]:
        """What the status adds to the state: when the run was last seen, where, the message
        it ended with, and the command that continues it."""
        status, state = self.status, self.state()
        if not status or state == "finished":
            return []
        lines = []
        if "heartbeat" in status:
            seen = claim.seconds_since(str(status["heartbeat"]))
            ago = f" ({seen:.0f} s ago)" if state == "running" else ""  # a live run's age
            lines.append(
                f"  last heartbeat {status['heartbeat']}{ago} at epoch "
                f"{status.get('epoch', '?')}, step {status.get('step', '?')}; newest "
                f"checkpoint {status.get('checkpoint') or 'none'}"
            )
        if status.get("message"):
            lines.append("  " + str(status["message"]).split("; to continue: ")[0])
        if state != "running" and status.get("continue"):
            lines.append(f"  to continue: {status['continue']}")
        return lines


def load_run(run_dir: str | Path) -> RunRecords:
    """The records of a run directory. Raises ``UsageError`` when it holds none of a run's
    files, or unreadable ones."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    epochs = _read_jsonl(layout.metrics, EpochRecord, strict=True)
    steps = _read_jsonl(layout.steps, StepRecord, strict=False)
    try:
        status = json.loads(layout.status.read_text())
    except (OSError, ValueError):  # absent, or caught mid-write
        status = {}
    status = status if isinstance(status, dict) else {}
    if epochs or status or steps or layout.config.exists():
        return RunRecords(layout, epochs, status, steps)
    if layout.metrics.exists():
        raise UsageError(f"{run_dir} has no finished epoch yet ({METRICS_FILE} is empty)")
    raise UsageError(
        f"{run_dir} is not a run directory (no {METRICS_FILE}, {STEPS_FILE} or {STATUS_FILE})"
    )


def _read_jsonl(path: Path, kind: type[_R], strict: bool) -> list[_R]:
    """The records of a JSONL file a run may be appending to: a partial last line is left out.
    ``strict``: any other bad line is a ``UsageError``; otherwise it is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        if not strict:
            return []
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            if strict and number < len(lines):
                raise UsageError(f"{path}, line {number}: not a JSON record") from None
            continue
        try:
            records.append(kind.from_dict(raw))
        except RecordError as e:
            if strict:
                raise UsageError(f"{path}, line {number}: {e}") from None
    return records


def _labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs, strict=True)]


def _render(headers: list[str], rows: list[list[str]], groups: list[tuple[str, int]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    if groups:  # a line naming each run above its columns
        cells, col = [], 0
        for label, span in groups:
            width = sum(widths[col : col + span]) + 2 * (span - 1)
            cells.append(label[:width].ljust(width))
            col += span
        lines.append("  ".join(cells).rstrip())
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _cells(
    record: EpochRecord | StepRecord | None, columns: Sequence[tuple[str, ...]]
) -> list[str]:
    return [fmt.format(getattr(record, key)) if record else "-" for _, key, fmt in columns]


def _table(runs: dict[str, RunRecords]) -> str:
    """The per-epoch table of one run (its newest steps before an epoch ends), or of several
    side by side under a line naming each run."""
    if len(runs) == 1:
        (run,) = runs.values()
        columns = EPOCH_COLUMNS if run.epochs else STEP_COLUMNS
        headers = [title for title, _, _ in columns]
        rows = [_cells(r, columns) for r in run.epochs or run.steps[-STEP_ROWS:]]
        groups = []
    else:
        by_epoch = [{r.epoch: r for r in run.epochs} for run in runs.values()]
        headers = ["epoch"] + [title for _ in runs for title, _, _ in SIDE_BY_SIDE]
        rows = [
            [str(epoch)]
            + [c for records in by_epoch for c in _cells(records.get(epoch), SIDE_BY_SIDE)]
            for epoch in sorted({epoch for records in by_epoch for epoch in records})
        ]
        groups = [("", 1)] + [(label, len(SIDE_BY_SIDE)) for label in runs]
    return _render(headers, rows, groups) if rows else ""


def format_report(runs: dict[str, RunRecords]) -> str:
    """The table of the runs, and each run's result."""
    results = []
    for label, run in runs.items():
        if not run.epochs:
            results.append(_first_epoch_result(label, run))
            continue
        last, best = run.epochs[-1], max(run.epochs, key=lambda r: r.test_accuracy)
        results.append(
            f"{label}: test accuracy {last.test_accuracy:.2%} "
            f"({last.test_correct}/{last.test_total}) after epoch "
            f"{last.epoch}; best {best.test_accuracy:.2%} at epoch {best.epoch}"
        )
        if run.status and run.state() != "finished":
            results.append("\n".join([f"{label}: {run.state()}", *run.state_lines()]))
    return "\n\n".join(part for part in (_table(runs), "\n".join(results)) if part)


def _first_epoch_result(label: str, run: RunRecords) -> str:
    last = run.steps[-1] if run.steps else None
    epoch = last.epoch if last else run.status.get("epoch", 1)
    where = "no step recorded yet"
    if last:
        where = (
            f"at global step {last.global_step}: train loss {last.train_loss:.4f}, "
            f"{last.images_per_second:,.0f} images/s"
        )
    text = f"{label}: {run.state()} in epoch {epoch}, no epoch finished yet; {where}"
    return "\n".join([text, *run.state_lines()])


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'mnist-dist[plot]'") from None
    return plt


def draw_curves(runs: dict[str, RunRecords]) -> Any:
    """A matplotlib figure of the runs' curves: the loss on a log scale (every step record's
    under the epoch figures), the accuracy zoomed to where it moves, the learning rate."""
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    accuracies = []
    for i, (label, run) in enumerate(runs.items()):
        color, records = f"C{i % 10}", run.epochs
        epochs = [r.epoch for r in records]
        if run.steps and records:  # steps placed at their fraction of an epoch
            steps_per_epoch = records[-1].global_step / records[-1].epoch
            x = [s.global_step / steps_per_epoch for s in run.steps]
            loss_ax.plot(
                x, [s.train_loss for s in run.steps], "-", color=color, alpha=0.35,
                linewidth=0.8, label=f"{label} train (every step record)",
            )  # fmt: skip
            lr_ax.plot(x, [s.lr for s in run.steps], "-", color=color, alpha=0.35, linewidth=0.8)
        for ax, key, style, name in (
            (loss_ax, "train_loss", "-o", "train (epoch mean)"),
            (loss_ax, "test_loss", "--s", "test"),
            (acc_ax, "train_accuracy", "-o", "train"),
            (acc_ax, "test_accuracy", "--s", "test"),
        ):
            values = [getattr(r, key) for r in records]
            if ax is acc_ax:
                accuracies.append(values)
                name += f" (last {values[-1]:.2%})" if values else ""
            ax.plot(epochs, values, style, color=color, markersize=4, label=f"{label} {name}")
        lr_ax.plot(epochs, [r.lr for r in records], "o", color=color, markersize=4, label=label)
    titles = ("loss (log scale)", "accuracy", "learning rate")
    for ax, title in zip((loss_ax, acc_ax, lr_ax), titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    loss_ax.set_yscale("log")
    lr_ax.set_yscale("log")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if limits := _moving_range(accuracies):
        acc_ax.set_ylim(*limits)
        acc_ax.set_title(f"accuracy (zoomed to {limits[0]:.1%}–{limits[1]:.1%})")
    fig.tight_layout()
    return fig


def _moving_range(series: list[list[float]]) -> tuple[float, float] | None:
    """The accuracy range where the curves move: from the lowest value after each run's first
    epoch (the first one starts far below and would flatten the rest), with a margin; a first
    epoch below it leaves the axis at the bottom. None when there is nothing to zoom to."""
    later = [v for values in series for v in (values[1:] if len(values) > 1 else values)]
    if not later:
        return None
    low, high = min(later), max(later)
    margin = max((high - low) * 0.15, 0.0005)
    return max(0.0, low - margin), min(1.0, high + margin)


def report(run_dirs: Sequence[str | Path], png: str | Path | None = None) -> str:
    """The text report of ``run_dirs``; with ``png``, the curves are also written there."""
    if png is not None:
        _pyplot()  # before reading anything
    runs = dict(zip(_labels(run_dirs), (load_run(d) for d in run_dirs), strict=True))
    if png is not None:
        fig = draw_curves(runs)
        try:
            fig.savefig(png, dpi=100)
        except OSError as e:
            raise UsageError(f"cannot write {png}: {e.strerror or e}") from None
        finally:
            _pyplot().close(fig)
    return format_report(runs)
