"""Training throughput and time-to-accuracy: plain PyTorch next to mnist-dist, side by side.

Rows (``--rows``, a comma list, or ``all``): the plain PyTorch baselines of ``baselines.py``,
(a) ``plain`` (the reference recipe as written: DataLoader, PIL transform, ``--plain-workers``),
(b) ``plain-tensor`` (mnist-dist's default recipe and speed options as a bare loop over device
tensors: (b) vs ``tensor`` is the harness's own overhead) and (c) ``captured`` ((b) with the
whole step in one CUDA graph; CUDA only, elsewhere reported as not available); then mnist-dist
rows, each ``python -m mnist_dist train`` in a subprocess with the flags in ``ROWS`` (``ddp2``
and ``ddp2-weak`` run 2 ranks under ``accelerate launch``). (b) and (c) use deterministic
kernels as mnist-dist does by default; ``--no-deterministic`` turns them off everywhere.

Every row runs in a new Python process, so that none gains from a process warmed by the rows
before it. A row that fails is reported with its reason and the others still run (exit code 1).
The JSON (``--json-out``) is rewritten after every row. images/s counts training only and is
steady state: the first epoch (and any compile time) is left out when there are two or more.
"recipe s" is the training function with its evaluations; "process s" adds interpreter start
and imports. With ``--repeats`` the rows take turns, each repeat starting one row later, and the
table shows medians; a run during which other processes took CPU is flagged. E.g.::

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
from collections.abc import Callable, Sequence
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

BUSY_CORES = 0.25  # CPU used by other processes (cores) above which a run is flagged
REPO_ROOT = Path(__file__).resolve().parent.parent

# Row -> its name, and for mnist-dist's rows the extra `train` flags (None: a baseline).
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "plain": ("(a) plain PyTorch, reference recipe", None),
    "plain-tensor": ("(b) plain PyTorch, device tensors", None),
    "captured": ("(c) plain PyTorch, step in one CUDA graph", None),
    "tensor": ("mnist-dist (default)", []),
    "eager": ("mnist-dist --cuda-graph off", ["--cuda-graph", "off"]),
    "nondeterministic": ("mnist-dist --no-deterministic", ["--no-deterministic"]),
    "no-channels-last": ("mnist-dist --no-channels-last", ["--no-channels-last"]),
    "bf16": ("mnist-dist --mixed-precision bf16", ["--mixed-precision", "bf16"]),
    "fp16": ("mnist-dist --mixed-precision fp16", ["--mixed-precision", "fp16"]),
    "compile": ("mnist-dist --compile", ["--compile"]),
    "eval-10000": ("mnist-dist --eval-batch-size 10000", ["--eval-batch-size", "10000"]),
    "torchvision": ("mnist-dist --loader torchvision", ["--loader", "torchvision"]),
    "ddp2": ("mnist-dist, 2 DDP ranks, batch 64", []),
    "ddp2-weak": ("mnist-dist, 2 DDP ranks, 64 per rank", ["--batch-size", "128"]),
}
ROW_NAMES = {row: name for row, (name, _) in ROWS.items()}
DDP_ROWS = ("ddp2", "ddp2-weak")  # under accelerate launch, 2 ranks
# Rows that cannot run without a CUDA GPU, and why: elsewhere they are skipped with this line.
CUDA_ONLY_ROWS = {
    "captured": "a CUDA graph needs a CUDA GPU and none is visible",
    "fp16": "fp16 autocast needs a CUDA GPU and none is visible",
}


def run_timed(command: list[str], what: str) -> float:
    """Run ``command`` from the repository root and return its wall seconds; raise with the
    tail of its output if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        command_line = " ".join(command)
        raise RuntimeError(
            "\n".join([f"{what} exited with {proc.returncode}: {command_line}", *tail])
        )
    return time.perf_counter() - started


def run_mnist_dist(row: str, args: argparse.Namespace) -> RunResult:
    """``mnist-dist train`` with the row's flags in a subprocess; its run directory, read."""
    flags = [*ROWS[row][1], *([] if args.deterministic else ["--no-deterministic"])]
    if args.max_train_samples is not None:
        flags += ["--max-train-samples", str(args.max_train_samples)]
    launcher = [sys.executable, "-m"]
    if row in DDP_ROWS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [
            str(Path(sys.executable).with_name("accelerate")), "launch",
            "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
            "--main_process_port", str(port), "-m",
        ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        layout = RunLayout(Path(tmp) / "run")
        command = [
            *launcher, "mnist_dist", "train", "--data-dir", args.data_dir, "--output-dir",
            str(layout.root), "--epochs", str(args.epochs), "--tracker", "none", *flags,
        ]  # fmt: skip
        process_seconds = run_timed(command, "mnist-dist")
        summary = json.loads(layout.summary.read_text())
        resolved = yaml.safe_load(layout.config.read_text()) or {}
        records = [json.loads(line) for line in layout.metrics.read_text().splitlines() if line]
    timings = [
        EpochTiming(
            r["epoch"], round(r["images_per_second"] * r["train_seconds"]), r["train_seconds"]
        )
        for r in records
    ]
    return RunResult(
        row=row,
        images_per_second=steady_images_per_second(timings),
        test_accuracy=float(summary["test_accuracy"]),
        test_correct=summary["test_correct"],
        test_total=summary["test_total"],
        wall_seconds=summary["segment_wall_seconds"],
        process_seconds=process_seconds,
        epochs=timings,
        extra={
            **{
                k: summary[k]
                for k in ("world_size", "mixed_precision", "step_engine", "deterministic")
            },
            "train_seconds": sum(t.train_seconds for t in timings),
            "num_workers": resolved.get("data", {}).get("num_workers"),
            "summary_images_per_second": summary["images_per_second"],
            "epoch_seconds": [r["epoch_seconds"] for r in records],
            "test_accuracy_per_epoch": [r["test_accuracy"] for r in records],
        },
    )


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used since boot (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished (waited-for) children."""
    usages = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def run_plain_subprocess(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a), (b) or (c) in a new Python process, like the mnist-dist rows: a fresh process
    (allocator, caches, thread pools) is not the harness's cost, so no row runs in a warm one.
    In-process, a (b) after other rows measured 17,000-18,000 images/s where new processes
    gave 11,000-17,000."""
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, str(Path(__file__).resolve()), "--worker", row,
            "--data-dir", args.data_dir, "--epochs", str(args.epochs),
            "--plain-workers", str(args.plain_workers), "--result-json", str(out),
            "--deterministic" if args.deterministic else "--no-deterministic",
        ]  # fmt: skip
        if args.max_train_samples is not None:
            command += ["--max-train-samples", str(args.max_train_samples)]
        process_seconds = run_timed(command, f"row {row}")
        saved = json.loads(out.read_text())
    return result_from_dict({**saved, "process_seconds": process_seconds})


def result_from_dict(saved: dict[str, Any]) -> RunResult:
    return RunResult(**{**saved, "epochs": [EpochTiming(**e) for e in saved["epochs"]]})


def run_row(row: str, args: argparse.Namespace) -> RunResult:
    """Run one row in a new process and note how much CPU other processes took meanwhile
    (steal included)."""
    busy, own, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    run = run_plain_subprocess if row in BASELINE_ROWS else run_mnist_dist
    result = run(row, args)
    busy_after = machine_busy_seconds()
    if busy is not None and busy_after is not None:
        other = (busy_after - busy) - (own_cpu_seconds() - own)
        result.other_cpu_cores = max(0.0, other) / (time.perf_counter() - started)
    return result


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": metadata.version("torchvision"),
        "accelerate": metadata.version("accelerate"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0],
    }


def ratio_fields(name: str, runs: list[RunResult], baseline: list[RunResult] | None) -> dict:
    """The median and range, as ``ratio_to_NAME`` and ``..._range``, of each repeat's rate over
    the baseline's in the same repeat: the rows take turns, so pairing by repeat cancels the
    machine's drift between repeats. (Written mid-way, one may hold one more repeat than the
    other; that one is left unpaired.)"""
    pairs = zip(runs, baseline or [], strict=False)
    ratios = [r.images_per_second / b.images_per_second for r, b in pairs]
    return {
        f"ratio_to_{name}": statistics.median(ratios) if ratios else None,
        f"ratio_to_{name}_range": [min(ratios), max(ratios)] if ratios else None,
    }


def summarize_rows(runs: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """Per row with runs: medians over its repeats, and its ratios to rows (a), (b) and (c)."""
    baselines = {"plain": "plain", "plain_tensor": "plain-tensor", "captured": "captured"}
    summaries = []
    for row, row_runs in ((row, r) for row, r in runs.items() if r):
        process = [r.process_seconds for r in row_runs if r.process_seconds is not None]
        other = [r.other_cpu_cores for r in row_runs if r.other_cpu_cores is not None]
        speeds = [r.images_per_second for r in row_runs]
        summary = {
            "row": row,
            "name": ROW_NAMES[row],
            "images_per_second": statistics.median(speeds),
            "images_per_second_range": [min(speeds), max(speeds)],
        }
        for name, baseline in baselines.items():
            summary |= ratio_fields(name, row_runs, runs.get(baseline))
        summaries.append(
            summary
            | {
                "test_accuracy": statistics.median(r.test_accuracy for r in row_runs),
                "wall_seconds": statistics.median(r.wall_seconds for r in row_runs),
                "process_seconds": statistics.median(process) if process else None,
                "max_other_cpu_cores": max(other) if other else None,
                "runs": [asdict(r) for r in row_runs],
            }
        )
    return summaries


def format_table(rows: list[dict[str, Any]]) -> str:
    # The (c) column only where (c) ran: on a machine without CUDA it never does.
    with_c = any(r.get("ratio_to_captured") is not None for r in rows)
    ratio_keys = ["ratio_to_plain", "ratio_to_plain_tensor"] + ["ratio_to_captured"] * with_c
    header = ["row", "images/s", "vs (a)", "vs (b)", *["vs (c)"] * with_c]
    header += ["test acc", "recipe s", "process s"]

    def shown(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        [
            r["name"],
            f"{r['images_per_second']:,.0f}",
            *(ratio(r.get(key)) for key in ratio_keys),
            f"{r['test_accuracy']:.2%}",
            f"{r['wall_seconds']:.1f}",
            shown(r["process_seconds"], ".1f"),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]
    text = [
        "  ".join(
            [
                cells[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)),
            ]
        )
        for cells in [header, ["-" * w for w in widths], *lines]
    ]
    return "\n".join(text)


def parse_rows(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    if not rows or any(r not in ROWS for r in rows):
        raise argparse.ArgumentTypeError(
            f"rows must be a comma list from {','.join(ROWS)}, got {text!r}"
        )
    return list(dict.fromkeys(rows))  # de-duplicated, order kept


def at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return int(text)

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Training throughput of plain PyTorch (reference recipe) vs mnist-dist."
    )
    add = parser.add_argument
    add(
        "--data-dir",
        default=os.environ.get("MNIST_DIST_DATA_DIR") or "./data",
        help="folder holding MNIST/raw/*-ubyte (default: env MNIST_DIST_DATA_DIR or ./data)",
    )
    add("--epochs", type=at_least(1), default=2, help="epochs per run")
    add("--repeats", type=at_least(1), default=1, help="runs per row; medians are reported")
    add("--max-train-samples", type=at_least(1), help="train on the first N images only")
    add(
        "--rows",
        type=parse_rows,
        default=parse_rows("plain,plain-tensor,tensor"),
        help=f"'all' or a comma list from {','.join(ROWS)} (default: plain,plain-tensor,tensor)",
    )
    add("--plain-workers", type=at_least(0), default=0, help="DataLoader workers for row (a)")
    add(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic kernels in rows (b) and (c), as mnist-dist's default; "
        "--no-deterministic also passes --no-deterministic to the mnist-dist rows",
    )
    add("--json-out", metavar="PATH", help="also write the results as JSON (after every row)")
    add("--table-from", metavar="JSON", help="print the table of an earlier --json-out again")
    # Internal: run one of the bare rows in this process and write its result as JSON.
    add("--worker", choices=BASELINE_ROWS, help=argparse.SUPPRESS)
    add("--result-json", help=argparse.SUPPRESS)
    return parser


def failure_reason(error: BaseException) -> str:
    """One line for a failed row: mnist-dist's own error line if its output has one, else the
    last line of the output (``run_timed`` puts the output's tail in its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("mnist-dist: error:")]
    return (ours or lines or [type(error).__name__])[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        runs = {r["row"]: [result_from_dict(x) for x in r["runs"]] for r in saved["rows"]}
        print(format_table(summarize_rows(runs)))
        return 0
    args.data_dir = str(Path(args.data_dir).resolve())
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"throughput.py: no MNIST/raw under {args.data_dir}", file=sys.stderr)
        return 2
    if args.worker:
        result = run_baseline(
            args.worker, args.data_dir, args.epochs, args.max_train_samples,
            args.plain_workers, args.deterministic,
        )  # fmt: skip
        Path(args.result_json).write_text(json.dumps(asdict(result)))
        return 0

    m = machine_info()
    print(
        f"machine: {m['cpu_model']} ({m['cpu_count']} CPUs), torch threads "
        f"{m['torch_num_threads']}, GPU {m['cuda'] or 'none'}; python {m['python']}, torch "
        f"{m['torch']}, torchvision {m['torchvision']}, accelerate {m['accelerate']}"
    )
    steady = "epochs 2.." + str(args.epochs) if args.epochs >= 2 else "epoch 1"
    print(
        f"settings: {args.epochs} epoch(s), {args.max_train_samples or 60_000} training images, "
        f"{args.repeats} repeat(s), images/s over {steady}, plain workers {args.plain_workers}, "
        f"deterministic (b), (c) {'on' if args.deterministic else 'off'}"
    )
    unavailable: dict[str, str] = {}
    if m["cuda"] is None:
        unavailable = {row: CUDA_ONLY_ROWS[row] for row in args.rows if row in CUDA_ONLY_ROWS}
    for row, why in unavailable.items():
        print(f"{ROW_NAMES[row]}: not available here: {why}")
    failed: dict[str, str] = {}
    rows_to_run = [row for row in args.rows if row not in unavailable]
    runs: dict[str, list[RunResult]] = {row: [] for row in rows_to_run}

    def write_json() -> None:
        settings = {k: getattr(args, k) for k in ("data_dir", "epochs", "repeats", "rows")}
        settings |= {k: getattr(args, k) for k in ("max_train_samples", "plain_workers")}
        settings |= {"deterministic": args.deterministic, "seed": TRAIN.seed}
        out = {
            "machine": {**m, "load_average_1min_after": os.getloadavg()[0]},
            "settings": {**settings, "batch_size": TRAIN.global_batch_size},
            "rows": summarize_rows(runs),
            "unavailable": unavailable,
            "failed": failed,
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")

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
            if (result.other_cpu_cores or 0.0) > BUSY_CORES:
                print(
                    f"warning: other processes used {result.other_cpu_cores:.2f} CPU cores "
                    "during this run: its timings are distorted",
                    file=sys.stderr,
                )
            if args.json_out:
                write_json()

    rows = summarize_rows(runs)
    if rows:
        print(f"\n{format_table(rows)}")
    flagged = [r["name"] for r in rows if (r["max_other_cpu_cores"] or 0.0) > BUSY_CORES]
    if flagged:
        print(f"distorted by other processes (see warnings): {', '.join(flagged)}")
    if failed:
        print(f"failed: {', '.join(ROW_NAMES[row] for row in failed)}", file=sys.stderr)
    if args.json_out:
        write_json()
        print(f"\nresults written to {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
