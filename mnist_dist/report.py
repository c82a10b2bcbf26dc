"""``mnist-dist report``: runs without W&B, from the records in their run directories, as a
table and (with matplotlib) their curves in a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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
# Side by side, each run shows lr, train loss, test loss and test acc after the epoch column.
SIDE_BY_SIDE = tuple(EPOCH_COLUMNS[i] for i in (1, 2, 4, 5))
# A run that has not finished an epoch shows its newest step records.
STEP_COLUMNS = (("global step", "global_step", "{}"), *(EPOCH_COLUMNS[i] for i in (0, 1, 2, 7)))
_R = TypeVar("_R", EpochRecord, StepRecord)


class RunRecords(NamedTuple):
    """What a run directory tells: its epoch records, status, step records and state."""

    epochs: list[EpochRecord]
    status: dict[str, Any]  # status.json
    steps: list[StepRecord]  # steps.jsonl
    state: str  # "running" only while the run shows signs of life


def load_run(run_dir: str | Path) -> RunRecords:
    """The records of a run directory; ``UsageError`` when it holds none, or unreadable ones."""
    layout = RunLayout(Path(run_dir))
    epochs = _read_jsonl(layout.metrics, EpochRecord, strict=True)
    steps = _read_jsonl(layout.steps, StepRecord, strict=False)
    try:
        status = json.loads(layout.status.read_text())
    except (OSError, ValueError):  # absent, or caught mid-write
        status = {}
    status = status if isinstance(status, dict) else {}
    if not (epochs or status or steps or layout.config.exists()):
        if layout.metrics.exists():
            raise UsageError(f"{run_dir} has no finished epoch yet ({METRICS_FILE} is empty)")
        raise UsageError(
            f"{run_dir} is not a run directory (no {METRICS_FILE}, {STEPS_FILE} or {STATUS_FILE})"
        )
    state = str(status.get("state", "state unknown (no status.json)"))
    if state == "running" and (dead := claim.dead_because(layout, status)):
        state = f"not running ({dead})"
    return RunRecords(epochs, status, steps, state)


def _read_jsonl(path: Path, kind: type[_R], strict: bool) -> list[_R]:
    """The records of a JSONL file a run may be appending to: a partial last line is left out.
    ``strict``: any other bad line is a ``UsageError``; otherwise it is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        if strict and not isinstance(e, FileNotFoundError):
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(kind.from_dict(json.loads(line)))
        except RecordError as e:
            if strict:
                raise UsageError(f"{path}, line {number}: {e}") from None
        except ValueError:  # not JSON: a last line is still being written
            if strict and number < len(lines):
                raise UsageError(f"{path}, line {number}: not a JSON record") from None
    return records


def _cells(record: EpochRecord | StepRecord | None, columns: Sequence[tuple]) -> list[str]:
    return [fmt.format(getattr(record, key)) if record else "-" for _, key, fmt in columns]


def _table(runs: dict[str, RunRecords]) -> str:
    """The per-epoch table of one run (its newest steps before an epoch ends), or of several."""
    if len(runs) == 1:
        (run,) = runs.values()
        columns = EPOCH_COLUMNS if run.epochs else STEP_COLUMNS
        headers = [title for title, _, _ in columns]
        rows = [_cells(r, columns) for r in run.epochs or run.steps[-10:]]  # newest steps
    else:
        by_epoch = [{r.epoch: r for r in run.epochs} for run in runs.values()]
        headers = ["epoch"] + [title for _ in runs for title, _, _ in SIDE_BY_SIDE]
        rows = [
            [str(epoch)]
            + [c for records in by_epoch for c in _cells(records.get(epoch), SIDE_BY_SIDE)]
            for epoch in sorted({epoch for records in by_epoch for epoch in records})
        ]
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    if len(runs) > 1:  # a line naming each run above its columns
        span = len(SIDE_BY_SIDE)
        cells = [" " * widths[0]]
        for i, label in enumerate(runs):
            width = sum(widths[1 + i * span : 1 + (i + 1) * span]) + 2 * (span - 1)
            cells.append(label[:width].ljust(width))
        lines.append("  ".join(cells).rstrip())
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_report(runs: dict[str, RunRecords]) -> str:
    """The table of the runs, and each run's result and, unless finished, its status."""
    lines = []
    for label, run in runs.items():
        status = {} if run.state == "finished" else run.status  # when last seen, how it ended
        if run.epochs:
            last, best = run.epochs[-1], max(run.epochs, key=lambda r: r.test_accuracy)
            lines.append(
                f"{label}: test accuracy {last.test_accuracy:.2%} "
                f"({last.test_correct}/{last.test_total}) after epoch "
                f"{last.epoch}; best {best.test_accuracy:.2%} at epoch {best.epoch}"
            )
            if status:
                lines.append(f"{label}: {run.state}")
        else:
            step = run.steps[-1] if run.steps else None
            where = "no step recorded yet"
            if step:
                where = (
                    f"at global step {step.global_step}: train loss {step.train_loss:.4f}, "
                    f"{step.images_per_second:,.0f} images/s"
                )
            epoch = step.epoch if step else run.status.get("epoch", 1)
            lines.append(f"{label}: {run.state} in epoch {epoch}, no epoch finished yet; {where}")
        if "heartbeat" in status:
            seen = claim.seconds_since(str(status["heartbeat"]))
            ago = f" ({seen:.0f} s ago)" if run.state == "running" else ""  # a live run's age
            lines.append(
                f"  last heartbeat {status['heartbeat']}{ago} at epoch "
                f"{status.get('epoch', '?')}, step {status.get('step', '?')}; newest "
                f"checkpoint {status.get('checkpoint') or 'none'}"
            )
        if status.get("message"):
            lines.append("  " + str(status["message"]).split("; to continue: ")[0])
        if run.state != "running" and status.get("continue"):
            lines.append(f"  to continue: {status['continue']}")
    return "\n\n".join(part for part in (_table(runs), "\n".join(lines)) if part)


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'mnist-dist[plot]'") from None
    return Figure


def draw_curves(runs: dict[str, RunRecords]) -> Any:
    """A matplotlib figure of the runs' curves: the loss on a log scale (every step record's
    under the epoch figures), the accuracy zoomed to where it moves, the learning rate."""
    fig = _figure_class()(figsize=(16, 4.8), layout="tight")  # outside pyplot: nothing to close
    from matplotlib.ticker import PercentFormatter

    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
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
    # Zoomed to where the curves move: from the lowest value after each run's first epoch (the
    # first starts far below and would flatten the rest), with a margin.
    later = [v for values in accuracies for v in (values[1:] if len(values) > 1 else values)]
    if later:
        margin = max((max(later) - min(later)) * 0.15, 0.0005)
        low, high = max(0.0, min(later) - margin), min(1.0, max(later) + margin)
        acc_ax.set_ylim(low, high)
        acc_ax.set_title(f"accuracy (zoomed to {low:.1%}–{high:.1%})")
    return fig


def report(run_dirs: Sequence[str | Path], png: str | Path | None = None) -> str:
    """The text report of ``run_dirs``; with ``png``, the curves are also written there."""
    if png is not None:
        _figure_class()  # before reading anything
    # Folder names, or the paths as given where two runs share a name.
    names = [Path(d).name or str(d) for d in run_dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs, strict=True)]
    runs = dict(zip(labels, (load_run(d) for d in run_dirs), strict=True))
    if png is not None:
        try:
            draw_curves(runs).savefig(png, dpi=100)
        except OSError as e:
            raise UsageError(f"cannot write {png}: {e.strerror or e}") from None
    return format_report(runs)
