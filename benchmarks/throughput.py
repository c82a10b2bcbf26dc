"""Training throughput and time-to-accuracy: plain PyTorch next to mnist-dist, side by side.

Rows (``--rows``): the plain PyTorch baselines (a), (b), (c) of ``baselines.py``, and mnist-dist
with the flags in ``ROWS``. Every row runs in a new process; with ``--repeats`` the rows take
turns, each repeat starting one row later, and the table shows medians. images/s counts training
only, over the epochs after the first when there are two or more. A row that fails is reported
with its reason and the others still run (exit 1). See BENCHMARKS.md for the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from baselines import TRAIN, EpochTiming, RunResult, finished, run_device_tensors, run_plain
from common import add_data_dir, columns, one_line, write_json

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
    """Wall seconds of ``command`` run from the repository root; raises with its output's tail."""
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        first = f"{what} exited with {proc.returncode}: {' '.join(command)}"
        raise RuntimeError("\n".join([first, *tail]))
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
    keys = ("world_size", "mixed_precision", "step_engine", "deterministic")
    result = finished(
        row, summary["segment_wall_seconds"], timings, summary["test_correct"],
        summary["test_total"], **{k: summary[k] for k in keys},
        train_seconds=sum(t.train_seconds for t in timings),
        num_workers=resolved.get("data", {}).get("num_workers"),
        summary_images_per_second=summary["images_per_second"],
        epoch_seconds=[r["epoch_seconds"] for r in records],
        test_accuracy_per_epoch=[r["test_accuracy"] for r in records],
    )  # fmt: skip
    result.process_seconds = process_seconds
    return result


def others_cpu_seconds() -> float | None:
    """CPU seconds used since boot by other processes than this one and its children (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    usages = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy - sum(u.ru_utime + u.ru_stime for u in usages)


def run_baseline(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a), (b) or (c) in a new process, as the mnist-dist rows: a process warmed by other
    rows (allocator, caches, thread pools) made (b) up to 1.5x faster."""
    started, sizes = time.perf_counter(), (args.data_dir, args.epochs, args.max_train_samples)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        if row == "plain":
            job = pool.submit(run_plain, *sizes, args.plain_workers)
        else:
            job = pool.submit(run_device_tensors, row, *sizes, args.deterministic)
        result = job.result()
    result.process_seconds = time.perf_counter() - started
    return result


def as_result(saved: dict[str, Any]) -> RunResult:
    return RunResult(**{**saved, "epochs": [EpochTiming(**e) for e in saved["epochs"]]})


def run_row(row: str, args: argparse.Namespace) -> RunResult:
    """One row in a new process, with the CPU that other processes took meanwhile (steal too)."""
    others, started = others_cpu_seconds(), time.perf_counter()
    result = (run_baseline if ROWS[row][1] is None else run_mnist_dist)(row, args)
    if others is not None and (after := others_cpu_seconds()) is not None:
        result.other_cpu_cores = max(0.0, after - others) / (time.perf_counter() - started)
    return result


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
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


def summarize_rows(runs: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """Per row that ran: medians over its repeats, and its ratios to rows (a), (b) and (c)."""
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
        # Each repeat over the baseline in the same repeat, which cancels the machine's drift
        # between repeats (a repeat that only one of them has run yet is left out).
        for name, baseline in (("plain", "plain"), ("plain_tensor", "plain-tensor"),
                               ("captured", "captured")):  # fmt: skip
            pairs = zip(row_runs, runs.get(baseline) or [], strict=False)
            ratios = [r.images_per_second / b.images_per_second for r, b in pairs]
            summary[f"ratio_to_{name}"] = statistics.median(ratios) if ratios else None
            summary[f"ratio_to_{name}_range"] = [min(ratios), max(ratios)] if ratios else None
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

    def shown(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        [
            r["name"],
            f"{r['images_per_second']:,.0f}",
            *(shown(r.get(key), ".2f") + "x" * (r.get(key) is not None) for key in ratio_keys),
            f"{r['test_accuracy']:.2%}",
            f"{r['wall_seconds']:.1f}",
            shown(r["process_seconds"], ".1f"),
        ]
        for r in rows
    ]
    return columns([[*header, "test acc", "recipe s", "process s"], *lines], right=True)


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
    parser = argparse.ArgumentParser(description="Throughput: plain PyTorch vs mnist-dist.")
    add_data_dir(parser)
    add = parser.add_argument
    add("--epochs", type=at_least(1), default=2, help="epochs per run")
    add("--repeats", type=at_least(1), default=1, help="runs per row; medians are reported")
    add("--max-train-samples", type=at_least(1), help="train on the first N images only")
    rows, default = ",".join(ROWS), "plain,plain-tensor,tensor"
    add("--rows", type=parse_rows, default=parse_rows(default), help=f"'all' or some of {rows}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())["rows"]
        runs = {r["row"]: [as_result(x) for x in r["runs"]] for r in saved}
        print(format_table(summarize_rows(runs)))
        return 0
    args.data_dir = str(Path(args.data_dir).resolve())
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"throughput.py: no MNIST/raw under {args.data_dir}", file=sys.stderr)
        return 2

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
    cuda_only = {} if m["cuda"] else CUDA_ONLY_ROWS
    unavailable = {row: cuda_only[row] for row in args.rows if row in cuda_only}
    for row, why in unavailable.items():
        print(f"{ROW_NAMES[row]}: not available here: {why}")
    failed: dict[str, str] = {}
    rows_to_run = [row for row in args.rows if row not in unavailable]
    runs: dict[str, list[RunResult]] = {row: [] for row in rows_to_run}

    def save() -> None:
        keys = ("data_dir", "epochs", "repeats", "rows", "max_train_samples", "plain_workers")
        settings = {k: getattr(args, k) for k in (*keys, "deterministic")}
        settings |= {"seed": TRAIN.seed, "batch_size": TRAIN.global_batch_size}
        machine = {**m, "load_average_1min_after": os.getloadavg()[0]}
        out = {"machine": machine, "settings": settings, "rows": summarize_rows(runs)}
        write_json(Path(args.json_out), out | {"unavailable": unavailable, "failed": failed})

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
                failed[row] = one_line(str(e))
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
                save()

    rows = summarize_rows(runs)
    if rows:
        print(f"\n{format_table(rows)}")
    flagged = [r["name"] for r in rows if (r["max_other_cpu_cores"] or 0.0) > BUSY_CORES]
    if flagged:
        print(f"distorted by other processes (see warnings): {', '.join(flagged)}")
    if failed:
        print(f"failed: {', '.join(ROW_NAMES[row] for row in failed)}", file=sys.stderr)
    if args.json_out:
        save()
        print(f"\nresults written to {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
