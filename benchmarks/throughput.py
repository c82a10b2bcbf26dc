"""Training throughput and time-to-accuracy: plain PyTorch next to mnist-dist, side by side.

Rows (choose with ``--rows``, a comma list; ``--rows all`` runs every one):

* ``plain`` (a): the reference recipe: ``torchvision.datasets.MNIST`` with
  ``Compose([Grayscale(1), Resize((28, 28)), ToTensor()])``, ``DataLoader(batch_size=64,
  shuffle=True)`` (``--plain-workers`` worker processes, default 0 like the reference), the
  ``MnistCNN`` model, Adam (lr 1e-3), ``CrossEntropyLoss``, MultiStepLR(milestones=[5, 8],
  gamma=0.01) stepped per epoch; test accuracy after every epoch (batch 1000).
* ``plain-tensor`` (b): a plain PyTorch loop over device-resident tensors with the speed options
  of mnist-dist's default (channels-last, fused Adam, one seeded permutation per epoch,
  no host sync per step), evaluating after every epoch like mnist-dist. (b) vs ``tensor`` is
  the harness's own overhead: Accelerate, checkpoints, stop checks, logging.
* mnist-dist rows, each ``python -m mnist_dist train`` run as a real subprocess and read back
  from its run directory: ``tensor`` (the default), ``no-channels-last``, ``bf16`` (autocast),
  ``compile`` (``--compile``), ``eval-10000`` (one evaluation batch of 10,000), ``torchvision``
  (the DataLoader pipeline), ``ddp2`` (2 ranks under ``accelerate launch``, global batch 64) and
  ``ddp2-weak`` (2 ranks, 64 per rank: weak scaling).

Every row runs in a new Python process ((a) and (b) through this script's internal
``--worker``), so that none of them gains from a process warmed by the rows before it.

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
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from mnist_dist.model import MnistCNN

SEED = 0
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 1000
LR = 1e-3
LR_MILESTONES = [5, 8]
LR_GAMMA = 0.01
BUSY_CORES = 0.25  # CPU used by other processes (cores) above which a run is flagged
REPO_ROOT = Path(__file__).resolve().parent.parent

ROW_NAMES = {
    "plain": "(a) plain PyTorch, reference recipe",
    "plain-tensor": "(b) plain PyTorch, device tensors",
    "tensor": "mnist-dist (default)",
    "no-channels-last": "mnist-dist --no-channels-last",
    "bf16": "mnist-dist --mixed-precision bf16",
    "compile": "mnist-dist --compile",
    "eval-10000": "mnist-dist --eval-batch-size 10000",
    "torchvision": "mnist-dist --loader torchvision",
    "ddp2": "mnist-dist, 2 DDP ranks, batch 64",
    "ddp2-weak": "mnist-dist, 2 DDP ranks, 64 per rank",
}
# The mnist-dist rows: extra `train` flags, and whether 2 ranks run under accelerate launch.
MNIST_DIST_ROWS: dict[str, tuple[list[str], bool]] = {
    "tensor": ([], False),
    "no-channels-last": (["--no-channels-last"], False),
    "bf16": (["--mixed-precision", "bf16"], False),
    "compile": (["--compile"], False),
    "eval-10000": (["--eval-batch-size", "10000"], False),
    "torchvision": (["--loader", "torchvision"], False),
    "ddp2": ([], True),
    "ddp2-weak": (["--batch-size", "128"], True),
}


@dataclass
class EpochTiming:
    """Training images and training seconds of one epoch."""

    epoch: int
    images: int
    train_seconds: float


@dataclass
class RunResult:
    """One run of one row."""

    row: str
    images_per_second: float  # steady state, see steady_images_per_second
    test_accuracy: float
    test_correct: int
    test_total: int
    wall_seconds: float
    process_seconds: float | None = None  # the whole process, imports included
    other_cpu_cores: float | None = None  # CPU used meanwhile by other processes, in cores
    epochs: list[EpochTiming] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_images_per_second(epochs: Sequence[EpochTiming]) -> float:
    """Training images per second over all epochs but the first (all of them if only one)."""
    steady = [e for e in epochs if e.epoch >= 2] or list(epochs)
    return sum(e.images for e in steady) / sum(e.train_seconds for e in steady)


def reference_transform() -> transforms.Compose:
    return transforms.Compose(
        [transforms.Grayscale(1), transforms.Resize((28, 28)), transforms.ToTensor()]
    )


def run_plain(
    data_dir: str, epochs: int, max_train_samples: int | None, num_workers: int
) -> RunResult:
    """Train and test the reference recipe in this process."""
    started = time.perf_counter()
    seed_everything(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = reference_transform()
    train_set: Dataset = datasets.MNIST(
        root=data_dir, train=True, download=False, transform=transform
    )
    if max_train_samples is not None:
        train_set = Subset(train_set, range(min(max_train_samples, len(train_set))))
    test_set = datasets.MNIST(root=data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(
        train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=num_workers
    )
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE, num_workers=num_workers)

    model = MnistCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = MultiStepLR(optimizer, milestones=LR_MILESTONES, gamma=LR_GAMMA)
    criterion = nn.CrossEntropyLoss()

    timings: list[EpochTiming] = []
    correct = total = 0
    for epoch in range(1, epochs + 1):
        model.train()
        synchronize(device)
        epoch_start = time.perf_counter()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        synchronize(device)
        timings.append(EpochTiming(epoch, len(train_set), time.perf_counter() - epoch_start))
        scheduler.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                correct += int((model(images).argmax(dim=1) == labels).sum())
                total += labels.numel()
    return RunResult(
        row="plain",
        images_per_second=steady_images_per_second(timings),
        test_accuracy=correct / total,
        test_correct=correct,
        test_total=total,
        wall_seconds=time.perf_counter() - started,
        epochs=timings,
        extra={"device": str(device), "num_workers": num_workers},
    )


def bare_model_and_optimizer(
    device: torch.device, channels_last: bool = True
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Row (b)'s model and optimizer: mnist-dist's default speed options, no Accelerate."""
    model = MnistCNN().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=LR, fused=True)


def bare_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: AbstractContextManager[Any] | None = None,
) -> None:
    """Row (b)'s training step (under ``autocast`` for the forward pass, if given)."""
    with autocast or nullcontext():
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_plain_tensor(data_dir: str, epochs: int, max_train_samples: int | None) -> RunResult:
    """(b): the recipe as a plain loop over device-resident tensors, with mnist-dist's default
    speed options and none of its machinery."""
    started = time.perf_counter()
    seed_everything(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def split(train: bool, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        ds = datasets.MNIST(root=data_dir, train=train, download=False)
        n = len(ds) if limit is None else min(limit, len(ds))
        return ds.data[:n].to(device).unsqueeze(1).float().div_(255), ds.targets[:n].to(device)

    images, labels = split(True, max_train_samples)
    test_images, test_labels = split(False, None)
    model, optimizer = bare_model_and_optimizer(device)
    scheduler = MultiStepLR(optimizer, milestones=LR_MILESTONES, gamma=LR_GAMMA)
    n = len(labels)
    timings: list[EpochTiming] = []
    correct = 0
    for epoch in range(1, epochs + 1):
        model.train()
        synchronize(device)
        epoch_start = time.perf_counter()
        generator = torch.Generator().manual_seed(SEED * 100_003 + epoch)
        order = torch.randperm(n, generator=generator).to(device)
        for idx in order.split(BATCH_SIZE):
            bare_step(model, optimizer, images[idx], labels[idx])
        synchronize(device)
        timings.append(EpochTiming(epoch, n, time.perf_counter() - epoch_start))
        scheduler.step()
        model.eval()
        with torch.no_grad():
            hits = sum(
                (model(x).argmax(dim=1) == y).sum()
                for x, y in zip(
                    test_images.split(EVAL_BATCH_SIZE),
                    test_labels.split(EVAL_BATCH_SIZE),
                    strict=True,
                )
            )
        correct = int(hits)
    total = len(test_labels)
    return RunResult(
        row="plain-tensor",
        images_per_second=steady_images_per_second(timings),
        test_accuracy=correct / total,
        test_correct=correct,
        test_total=total,
        wall_seconds=time.perf_counter() - started,
        epochs=timings,
        extra={"device": str(device)},
    )


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
    row: str, data_dir: str, epochs: int, max_train_samples: int | None
) -> RunResult:
    """Run ``mnist-dist train`` (under ``accelerate launch`` for the DDP rows) as a subprocess
    and read its run directory."""
    extra_flags, launched = MNIST_DIST_ROWS[row]
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
        summary = json.loads((run_dir / "summary.json").read_text())
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        records = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
    timings = [
        EpochTiming(
            epoch=int(r["epoch"]),
            images=round(r["images_per_second"] * r["train_seconds"]),
            train_seconds=float(r["train_seconds"]),
        )
        for r in records
    ]
    return RunResult(
        row=row,
        images_per_second=steady_images_per_second(timings),
        test_accuracy=float(summary["test_accuracy"]),
        test_correct=int(summary["test_correct"]),
        test_total=int(summary["test_total"]),
        wall_seconds=float(summary["segment_wall_seconds"]),
        process_seconds=process_seconds,
        epochs=timings,
        extra={
            "world_size": summary.get("world_size"),
            "num_workers": resolved.get("data", {}).get("num_workers"),
            "summary_images_per_second": summary.get("images_per_second"),
            "epoch_seconds": [r.get("epoch_seconds") for r in records],
            "test_accuracy_per_epoch": [r.get("test_accuracy") for r in records],
        },
    )


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


def run_plain_row(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a) or (b) in this process."""
    if row == "plain":
        return run_plain(args.data_dir, args.epochs, args.max_train_samples, args.plain_workers)
    return run_plain_tensor(args.data_dir, args.epochs, args.max_train_samples)


def run_plain_subprocess(row: str, args: argparse.Namespace) -> RunResult:
    """Row (a) or (b) in a new Python process, like the mnist-dist rows: a fresh process
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
    if row in ("plain", "plain-tensor"):
        result = run_plain_subprocess(row, args)
    else:
        result = run_mnist_dist(row, args.data_dir, args.epochs, args.max_train_samples)
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
    pairing by repeat cancels the machine's drift between repeats."""
    if not baseline:
        return []
    pairs = zip(runs, baseline, strict=True)
    return [r.images_per_second / b.images_per_second for r, b in pairs]


def summarize_row(
    row: str,
    runs: list[RunResult],
    plain: list[RunResult] | None,
    plain_tensor: list[RunResult] | None,
) -> dict[str, Any]:
    """Medians over the repeats of one row, and its ratios to rows (a) and (b): the median of
    the per-repeat ratios, with their range."""
    process = [r.process_seconds for r in runs if r.process_seconds is not None]
    other = [r.other_cpu_cores for r in runs if r.other_cpu_cores is not None]
    to_plain, to_tensor_loop = paired_ratios(runs, plain), paired_ratios(runs, plain_tensor)
    return {
        "row": row,
        "name": ROW_NAMES[row],
        "images_per_second": statistics.median(r.images_per_second for r in runs),
        "images_per_second_range": [
            min(r.images_per_second for r in runs),
            max(r.images_per_second for r in runs),
        ],
        "ratio_to_plain": statistics.median(to_plain) if to_plain else None,
        "ratio_to_plain_range": [min(to_plain), max(to_plain)] if to_plain else None,
        "ratio_to_plain_tensor": statistics.median(to_tensor_loop) if to_tensor_loop else None,
        "ratio_to_plain_tensor_range": (
            [min(to_tensor_loop), max(to_tensor_loop)] if to_tensor_loop else None
        ),
        "test_accuracy": statistics.median(r.test_accuracy for r in runs),
        "wall_seconds": statistics.median(r.wall_seconds for r in runs),
        "process_seconds": statistics.median(process) if process else None,
        "max_other_cpu_cores": max(other) if other else None,
        "runs": [asdict(r) for r in runs],
    }


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
    header = ["row", "images/s", "vs (a)", "vs (b)", "test acc", "recipe s", "process s"]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        [
            r["name"],
            f"{r['images_per_second']:,.0f}",
            ratio(r["ratio_to_plain"]),
            ratio(r["ratio_to_plain_tensor"]),
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
        default=os.environ.get("MNIST_DIST_DATA_DIR", "./data"),
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
    parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON")
    # Internal: run one of the plain rows in this process and write its result as JSON.
    parser.add_argument("--worker", choices=["plain", "plain-tensor"], help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the table of an earlier --json-out again instead of running anything",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table_from:
        saved = runs_from_json(args.table_from)
        print(
            format_table(
                [
                    summarize_row(row, runs, saved.get("plain"), saved.get("plain-tensor"))
                    for row, runs in saved.items()
                ]
            )
        )
        return 0
    args.data_dir = str(Path(args.data_dir).resolve())
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        print(f"throughput.py: no MNIST/raw under {args.data_dir}", file=sys.stderr)
        return 2
    if args.worker:
        result = run_plain_row(args.worker, args)
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
        f"{args.repeats} repeat(s), images/s over {steady}, plain workers {args.plain_workers}"
    )

    runs: dict[str, list[RunResult]] = {row: [] for row in args.rows}
    for repeat in range(1, args.repeats + 1):
        # Rows take turns so that drift hits them alike, and each repeat starts one row later
        # so that no row always runs right after the same one.
        shift = (repeat - 1) % len(args.rows)
        for row in args.rows[shift:] + args.rows[:shift]:
            print(f"[{repeat}/{args.repeats}] {ROW_NAMES[row]} ...", end=" ", flush=True)
            result = run_row(row, args)
            runs[row].append(result)
            print(f"{result.images_per_second:,.0f} images/s, {result.wall_seconds:.1f}s")
            if result.other_cpu_cores is not None and result.other_cpu_cores > BUSY_CORES:
                print(
                    f"warning: other processes used {result.other_cpu_cores:.2f} CPU cores "
                    "during this run: its timings are distorted",
                    file=sys.stderr,
                )

    rows = [
        summarize_row(row, runs[row], runs.get("plain"), runs.get("plain-tensor")) for row in runs
    ]
    print()
    print(format_table(rows))
    flagged = [r["name"] for r in rows if (r["max_other_cpu_cores"] or 0.0) > BUSY_CORES]
    if flagged:
        print(f"distorted by other processes (see warnings): {', '.join(flagged)}")

    if args.json_out:
        settings = {
            "data_dir": args.data_dir,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "max_train_samples": args.max_train_samples,
            "rows": args.rows,
            "plain_workers": args.plain_workers,
            "seed": SEED,
            "batch_size": BATCH_SIZE,
        }
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        out = {
            "machine": {**machine, "load_average_1min_after": load_after},
            "settings": settings,
            "rows": rows,
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nresults written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
