"""Training throughput and time-to-accuracy: plain PyTorch next to mnist-dist, side by side.

Rows (choose with ``--rows``, a comma list; ``--rows all`` runs every one):

* the plain PyTorch baselines (``baselines.py`` describes them):

  * ``plain`` (a): the reference recipe as it was written: DataLoader and PIL transform
    (``--plain-workers`` worker processes, default 0 like the reference), a plain loop;
  * ``plain-tensor`` (b): mnist-dist's default recipe and speed options as a bare loop over
    device-resident tensors. (b) vs ``tensor`` is the harness's own overhead: Accelerate,
    checkpoints, stop checks, logging;
  * ``captured`` (c): (b) with the whole step captured in one CUDA graph and replayed per step.
    (c) vs ``tensor`` is the harness's cost on top of a captured step. It needs a CUDA GPU:
    elsewhere it is reported as not available and skipped.

* mnist-dist rows, each ``python -m mnist_dist train`` run as a real subprocess and read back
  from its run directory: ``tensor`` (the default), ``eager`` (``--cuda-graph off``),
  ``nondeterministic`` (``--no-deterministic``), ``no-channels-last``, ``bf16`` (autocast),
  ``fp16`` (autocast and a grad scaler; CUDA only), ``compile`` (``--compile``), ``eval-10000``
  (one evaluation batch of 10,000), ``torchvision`` (the DataLoader pipeline), ``ddp2`` (2 ranks
  under ``accelerate launch``, global batch 64) and ``ddp2-weak`` (2 ranks, 64 per rank: weak
  scaling).

(b) and (c) use deterministic kernels, as mnist-dist does by default (``--no-deterministic``
turns them off there and in every mnist-dist row); (a) is the reference as it was written.

Every row runs in a new Python process ((a), (b) and (c) through this script's internal
``--worker``), so that none of them gains from a process warmed by the rows before it. A row that
fails is reported with its reason and the others still run (the exit code is then 1). The JSON
(``--json-out``) is rewritten after every row, so an interrupted run keeps the rows it finished.

images/s counts training only (data loading included, evaluation excluded) and is steady state:
the first epoch (and with it any compile time) is left out when there are two or more. "recipe
s" is the whole training function with its per-epoch evaluations (mnist-dist's
``segment_wall_seconds``); "process s" adds interpreter start and imports. With ``--repeats``
the rows take turns, each repeat starting one row later, and the table shows medians; a run
during which other processes took CPU is flagged.

Run from the repository root, e.g.::

    python benchmarks/throughput.py --epochs 2
    python benchmarks/throughput.py --data-dir /data --epochs 10 --repeats 3 --rows all \\
        --json-out throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from baselines import (  # the plain PyTorch rows, in this folder
    BASELINE_ROWS,
    TRAIN,
    EpochTiming,
    RunResult,
    run_baseline,
    steady_images_per_second,
)

from mnist_dist.layout import RunLayout
from mnist_dist.records import EpochRecord, Summary

BUSY_CORES = 0.25  # CPU used by other processes (cores) above which a run is flagged
REPO_ROOT = Path(__file__).resolve().parent.parent

ROW_NAMES = {
    "plain": "(a) plain PyTorch, reference recipe",
    "plain-tensor": "(b) plain PyTorch, device tensors",
    "captured": "(c) plain PyTorch, step in one CUDA graph",
    "tensor": "mnist-dist (default)",
    "eager": "mnist-dist --cuda-graph off",
    "nondeterministic": "mnist-dist --no-deterministic",
    "no-channels-last": "mnist-dist --no-channels-last",
    "bf16": "mnist-dist --mixed-precision bf16",
    "fp16": "mnist-dist --mixed-precision fp16",
    "compile": "mnist-dist --compile",
    "eval-10000": "mnist-dist --eval-batch-size 10000",
    "torchvision": "mnist-dist --loader torchvision",
    "ddp2": "mnist-dist, 2 DDP ranks, batch 64",
    "ddp2-weak": "mnist-dist, 2 DDP ranks, 64 per rank",
}
# The mnist-dist rows: extra `train` flags, and whether 2 ranks run under accelerate launch.
MNIST_DIST_ROWS: dict[str, tuple[list[str], bool]] = {
    "tensor": ([], False),
    "eager": (["--cuda-graph", "off"], False),
    "nondeterministic": (["--no-deterministic"], False),
    "no-channels-last": (["--no-channels-last"], False),
    "bf16": (["--mixed-precision", "bf16"], False),
    "fp16": (["--mixed-precision", "fp16"], False),
    "compile": (["--compile"], False),
    "eval-10000": (["--eval-batch-size", "10000"], False),
    "torchvision": (["--loader", "torchvision"], False),
    "ddp2": ([], True),
    "ddp2-weak": (["--batch-size", "128"], True),
}
# Rows that cannot run without a CUDA GPU, and why: elsewhere they are skipped with this line.
CUDA_ONLY_ROWS = {
    "captured": "a CUDA graph needs a CUDA GPU and none is visible",
    "fp16": "fp16 autocast needs a CUDA GPU and none is visible",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_timed(command: list[str], what: str) -> float:
    """Run ``command`` from the repository root and return its wall seconds; raise with the
    tail of its output if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        raise RuntimeError(
            f"{what} exited with {proc.returncode}: {' '.join(command)}\n" + "\n".join(tail)
        )
    return seconds


def run_mnist_dist(
    row: str,
    data_dir: str,
    epochs: int,
    max_train_samples: int | None,
    deterministic: bool = True,
) -> RunResult:
    """Run ``mnist-dist train`` (under ``accelerate launch`` for the DDP rows) as a subprocess
    and read its run directory."""
    extra_flags, launched = MNIST_DIST_ROWS[row]
    if not deterministic:
        extra_flags = [*extra_flags, "--no-deterministic"]
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        launcher = [sys.executable, "-m"]
        if launched:
            launcher = [
                str(Path(sys.executable).with_name("accelerate")), "launch",
                "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
                "--main_process_port", str(free_port()), "-m",
            ]  # fmt: skip
        command = [
            *launcher, "mnist_dist", "train",
            "--data-dir", data_dir,
            "--output-dir", str(run_dir),
            "--epochs", str(epochs),
            "--tracker", "none",
            *extra_flags,
        ]  # fmt: skip
        if max_train_samples is not None:
            command += ["--max-train-samples", str(max_train_samples)]
        process_seconds = run_timed(command, "mnist-dist")
        layout = RunLayout(run_dir)
        summary = Summary.from_dict(json.loads(layout.summary.read_text()))
        resolved = yaml.safe_load(layout.config.read_text()) or {}
        records = [
            EpochRecord.from_dict(json.loads(line))
            for line in layout.metrics.read_text().splitlines()
            if line.strip()
        ]
    timings = [
        EpochTiming(
            epoch=r.epoch,
            images=round(r.images_per_second * written(r.train_seconds, "train_seconds")),
            train_seconds=written(r.train_seconds, "train_seconds"),
        )
        for r in records
    ]
    return RunResult(
        row=row,
        images_per_second=steady_images_per_second(timings),
        test_accuracy=float(summary.test_accuracy),
        test_correct=summary.test_correct,
        test_total=summary.test_total,
        wall_seconds=written(summary.segment_wall_seconds, "segment_wall_seconds"),
        process_seconds=process_seconds,
        epochs=timings,
        extra={
            "world_size": summary.world_size,
            "mixed_precision": summary.mixed_precision,
            "step_engine": summary.step_engine,
            "deterministic": summary.deterministic,
            "train_seconds": sum(t.train_seconds for t in timings),
            "num_workers": resolved.get("data", {}).get("num_workers"),
            "summary_images_per_second": summary.images_per_second,
            "epoch_seconds": [r.epoch_seconds for r in records],
            "test_accuracy_per_epoch": [r.test_accuracy for r in records],
        },
    )


def written(value: float | None, name: str) -> float:
    """A figure that the records of the current version always hold (None only in older
    runs' records, which a benchmark never reads)."""
    if value is None:
        raise RuntimeError(f"the run's records have no {name}")
    return float(value)


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used since boot (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished (waited-for) children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_plain_subprocess(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a), (b) or (c) in a new Python process, like the mnist-dist rows: a fresh process
    (allocator, caches, thread pools) is not the harness's cost, so no row runs in a warm one.
    In-process, a (b) after other rows measured 17,000-18,000 images/s where new processes
    gave 11,000-17,000."""
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--worker", row,
            "--data-dir", args.data_dir,
            "--epochs", str(args.epochs),
            "--plain-workers", str(args.plain_workers),
            "--result-json", str(out),
            "--deterministic" if args.deterministic else "--no-deterministic",
        ]  # fmt: skip
        if args.max_train_samples is not None:
            command += ["--max-train-samples", str(args.max_train_samples)]
        process_seconds = run_timed(command, f"row {row}")
        saved = json.loads(out.read_text())
    saved["epochs"] = [EpochTiming(**e) for e in saved["epochs"]]
    return RunResult(**{**saved, "process_seconds": process_seconds})


def run_row(row: str, args: argparse.Namespace) -> RunResult:
    """Run one row in a new process and note how much CPU other processes took meanwhile
    (steal included)."""
    busy, own, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if row in BASELINE_ROWS:
        result = run_plain_subprocess(row, args)
    else:
        result = run_mnist_dist(
            row, args.data_dir, args.epochs, args.max_train_samples, args.deterministic
        )
    busy_after = machine_busy_seconds()
    if busy is not None and busy_after is not None:
        other = (busy_after - busy) - (own_cpu_seconds() - own)
        result.other_cpu_cores = max(0.0, other) / (time.perf_counter() - started)
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"),
        "accelerate": metadata.version("accelerate"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def paired_ratios(runs: list[RunResult], baseline: list[RunResult] | None) -> list[float]:
    """Each repeat's rate over the baseline's rate in the same repeat: the rows take turns, so
    pairing by repeat cancels the machine's drift between repeats. (Written mid-way, one of the
    two may hold one more repeat than the other; that one is left unpaired.)"""
    if not baseline:
        return []
    pairs = zip(runs, baseline, strict=False)
    return [r.images_per_second / b.images_per_second for r, b in pairs]


def ratio_fields(name: str, ratios: list[float]) -> dict[str, Any]:
    """The median of ``ratios`` and their range, as ``ratio_to_NAME`` and ``..._range``."""
    return {
        f"ratio_to_{name}": statistics.median(ratios) if ratios else None,
        f"ratio_to_{name}_range": [min(ratios), max(ratios)] if ratios else None,
    }


def summarize_row(
    row: str,
    runs: list[RunResult],
    plain: list[RunResult] | None,
    plain_tensor: list[RunResult] | None,
    captured: list[RunResult] | None = None,
) -> dict[str, Any]:
    """Medians over the repeats of one row, and its ratios to rows (a), (b) and (c): the median
    of the per-repeat ratios, with their range."""
    process = [r.process_seconds for r in runs if r.process_seconds is not None]
    other = [r.other_cpu_cores for r in runs if r.other_cpu_cores is not None]
    return {
        "row": row,
        "name": ROW_NAMES[row],
        "images_per_second": statistics.median(r.images_per_second for r in runs),
        "images_per_second_range": [
            min(r.images_per_second for r in runs),
            max(r.images_per_second for r in runs),
        ],
        **ratio_fields("plain", paired_ratios(runs, plain)),
        **ratio_fields("plain_tensor", paired_ratios(runs, plain_tensor)),
        **ratio_fields("captured", paired_ratios(runs, captured)),
        "test_accuracy": statistics.median(r.test_accuracy for r in runs),
        "wall_seconds": statistics.median(r.wall_seconds for r in runs),
        "process_seconds": statistics.median(process) if process else None,
        "max_other_cpu_cores": max(other) if other else None,
        "runs": [asdict(r) for r in runs],
    }


def summarize_rows(runs: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """``summarize_row`` for every row that has runs, against the baselines among them."""
    baselines = (runs.get("plain"), runs.get("plain-tensor"), runs.get("captured"))
    return [summarize_row(row, r, *baselines) for row, r in runs.items() if r]


def runs_from_json(path: str) -> dict[str, list[RunResult]]:
    """The runs of an earlier ``--json-out``, to print its table again."""
    saved = json.loads(Path(path).read_text())
    runs = {}
    for row in saved["rows"]:
        runs[row["row"]] = [
            RunResult(**{**r, "epochs": [EpochTiming(**e) for e in r["epochs"]]})
            for r in row["runs"]
        ]
    return runs


def format_table(rows: list[dict[str, Any]]) -> str:
    # The (c) column only where (c) ran: on a machine without CUDA it never does.
    with_c = any(r.get("ratio_to_captured") is not None for r in rows)
    ratio_keys = ["ratio_to_plain", "ratio_to_plain_tensor"] + ["ratio_to_captured"] * with_c
    header = ["row", "images/s", "vs (a)", "vs (b)", *["vs (c)"] * with_c]
    header += ["test acc", "recipe s", "process s"]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        [
            r["name"],
            f"{r['images_per_second']:,.0f}",
            *(ratio(r.get(key)) for key in ratio_keys),
            f"{r['test_accuracy']:.2%}",
            f"{r['wall_seconds']:.1f}",
            "-" if r["process_seconds"] is None else f"{r['process_seconds']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def parse_rows(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ROW_NAMES)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_NAMES]
    if not rows or unknown:
        raise argparse.ArgumentTypeError(
            f"rows must be a comma list from {','.join(ROW_NAMES)}, got {text!r}"
        )
    return list(dict.fromkeys(rows))  # de-duplicated, order kept


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Training throughput of plain PyTorch (reference recipe) vs mnist-dist."
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DIST_DATA_DIR") or "./data",
        help="folder holding MNIST/raw/*-ubyte (default: env MNIST_DIST_DATA_DIR or ./data)",
    )
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs per run")
    parser.add_argument(
        "--repeats", type=positive_int, default=1, help="runs per row; medians are reported"
    )
    parser.add_argument(
        "--max-train-samples",
        type=positive_int,
        default=None,
        help="train on the first N images only (default: all 60,000)",
    )
    parser.add_argument(
        "--rows",
        type=parse_rows,
        default=parse_rows("plain,plain-tensor,tensor"),
        help=f"'all' or a comma list from {','.join(ROW_NAMES)} "
        "(default: plain,plain-tensor,tensor)",
    )
    parser.add_argument(
        "--plain-workers",
        type=non_negative_int,
        default=0,
        help="DataLoader workers for the plain row (default: 0, like the reference)",
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic kernels in rows (b) and (c), as mnist-dist's default; "
        "--no-deterministic also passes --no-deterministic to the mnist-dist rows",
    )
    parser.add_argument(
        "--json-out",
        metavar="PATH",
        help="also write the results as JSON (rewritten after every row)",
    )
    # Internal: run one of the bare rows in this process and write its result as JSON.
    parser.add_argument("--worker", choices=BASELINE_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the table of an earlier --json-out again instead of running anything",
    )
    return parser


def failure_reason(error: BaseException) -> str:
    """One line for a failed row: mnist-dist's own error line if its output has one, else the
    last line of the output (``run_timed`` puts the output's tail in its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("mnist-dist: error:")]
    if ours:
        return ours[-1]
    return lines[-1] if lines else type(error).__name__


def write_json(
    path: str,
    machine: dict[str, Any],
    args: argparse.Namespace,
    runs: dict[str, list[RunResult]],
    not_run: dict[str, dict[str, str]],
) -> None:
    """The results so far: rewritten after every row, so an interrupted run keeps them."""
    settings = {
        "data_dir": args.data_dir,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "max_train_samples": args.max_train_samples,
        "rows": args.rows,
        "plain_workers": args.plain_workers,
        "deterministic": args.deterministic,
        "seed": TRAIN.seed,
        "batch_size": TRAIN.global_batch_size,
    }
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = {
        "machine": {**machine, "load_average_1min_after": load_after},
        "settings": settings,
        "rows": summarize_rows(runs),
        **not_run,  # "unavailable" and "failed": row -> reason
    }
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        print(format_table(summarize_rows(runs_from_json(args.table_from))))
        return 0
    args.data_dir = str(Path(args.data_dir).resolve())
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"throughput.py: no MNIST/raw under {args.data_dir}", file=sys.stderr)
        return 2
    if args.worker:
        result = run_baseline(
            args.worker,
            args.data_dir,
            args.epochs,
            args.max_train_samples,
            args.plain_workers,
            args.deterministic,
        )
        Path(args.result_json).write_text(json.dumps(asdict(result)))
        return 0

    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), "
        f"torch threads {machine['torch_num_threads']}, GPU {machine['cuda'] or 'none'}; "
        f"python {machine['python']}, torch {machine['torch']}, "
        f"torchvision {machine['torchvision']}, accelerate {machine['accelerate']}"
    )
    steady = "epochs 2.." + str(args.epochs) if args.epochs >= 2 else "epoch 1"
    print(
        f"settings: {args.epochs} epoch(s), {args.max_train_samples or 60_000} training images, "
        f"{args.repeats} repeat(s), images/s over {steady}, plain workers {args.plain_workers}, "
        f"deterministic (b), (c) {'on' if args.deterministic else 'off'}"
    )
    unavailable: dict[str, str] = {}
    if machine["cuda"] is None:
        unavailable = {row: CUDA_ONLY_ROWS[row] for row in args.rows if row in CUDA_ONLY_ROWS}
    for row, why in unavailable.items():
        print(f"{ROW_NAMES[row]}: not available here: {why}")
    failed: dict[str, str] = {}
    rows_to_run = [row for row in args.rows if row not in unavailable]
    runs: dict[str, list[RunResult]] = {row: [] for row in rows_to_run}
    for repeat in range(1, args.repeats + 1):
        # Rows take turns so that drift hits them alike, and each repeat starts one row later
        # so that no row always runs right after the same one.
        shift = (repeat - 1) % max(len(rows_to_run), 1)
        for row in rows_to_run[shift:] + rows_to_run[:shift]:
            if row in failed:
                continue
            print(f"[{repeat}/{args.repeats}] {ROW_NAMES[row]} ...", end=" ", flush=True)
            try:
                result = run_row(row, args)
            except Exception as e:  # any row's failure: report it, run the others
                failed[row] = failure_reason(e)
                print(f"failed: {failed[row]}")
                print(str(e), file=sys.stderr)
                continue
            runs[row].append(result)
            print(f"{result.images_per_second:,.0f} images/s, {result.wall_seconds:.1f}s")
            if result.other_cpu_cores is not None and result.other_cpu_cores > BUSY_CORES:
                print(
                    f"warning: other processes used {result.other_cpu_cores:.2f} CPU cores "
                    "during this run: its timings are distorted",
                    file=sys.stderr,
                )
            if args.json_out:
                not_run = {"unavailable": unavailable, "failed": failed}
                write_json(args.json_out, machine, args, runs, not_run)

    rows = summarize_rows(runs)
    if rows:
        print()
        print(format_table(rows))
    flagged = [r["name"] for r in rows if (r["max_other_cpu_cores"] or 0.0) > BUSY_CORES]
    if flagged:
        print(f"distorted by other processes (see warnings): {', '.join(flagged)}")
    if failed:
        print(f"failed: {', '.join(ROW_NAMES[row] for row in failed)}", file=sys.stderr)

    if args.json_out:
        write_json(
            args.json_out, machine, args, runs, {"unavailable": unavailable, "failed": failed}
        )
        print(f"\nresults written to {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
