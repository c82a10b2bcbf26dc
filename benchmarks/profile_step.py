"""Per-step cost of mnist-dist's training step, so that a regression is visible.

Profiles ``--steps`` steps of ``train_step``, built as ``mnist-dist train`` builds it, and prints
host ms, ATen ops and (on a GPU) CUDA kernels, kernel ms and host-to-device bytes per step.
``--versus-plain R`` then times it against row (b)'s bare step (``baselines.py``) in R
interleaved rounds; ``--captured-ops`` instead counts the ATen ops of one step of the CUDA graph
that the default engine captures, run eagerly on the CPU, against row (c)'s. E.g.::

    python benchmarks/profile_step.py --data-dir ../shared/data --steps 100 --versus-plain 10
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml benchmarks/profile_step.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Rows (b) and (c), and what the scripts share, from this folder.
from baselines import CapturableStep, bare_model_and_optimizer, bare_step, synchronize
from common import add_data_dir
from torch.profiler import ProfilerActivity, profile

from mnist_dist.config import DataConfig, OptimConfig, TrainConfig
from mnist_dist.data import (
    Sharding,
    TensorTrainData,
    TrainData,
    build_train_data,
    ensure_raw_files,
    eval_batches,
)
from mnist_dist.distributed import make_accelerator
from mnist_dist.engine import CapturedStep, StepFigures, train_step
from mnist_dist.evaluate import evaluate
from mnist_dist.train import build_model_and_optimizer


def trace_totals(trace_path: Path) -> tuple[int, float]:
    """Bytes copied host-to-device, and microseconds of GPU kernels, in a Chrome trace."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    copied = sum(
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    )
    kernel_us = sum(float(e.get("dur", 0)) for e in events if e.get("cat") == "kernel")
    return copied, kernel_us


def profile_steps(args: argparse.Namespace) -> tuple[dict[str, Any], str] | None:
    """The summary and op table of ``args.steps`` profiled steps (None on ranks but the first)."""
    training = TrainConfig(
        global_batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    data_settings = DataConfig(data_dir=args.data_dir, loader=args.loader)
    if args.versus_plain and training.mixed_precision == "fp16":
        raise SystemExit("--versus-plain: the bare loop has no fp16 grad scaler; use no or bf16")
    accelerator = make_accelerator(training.mixed_precision, static_graph=True)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.versus_plain and world > 1:
        raise SystemExit("--versus-plain compares one process with a bare loop: run it alone")
    training.per_device_batch_size(world)
    ensure_raw_files(accelerator, data_settings)
    model, optimizer = build_model_and_optimizer(accelerator, training, lr=OptimConfig().lr)
    data = build_train_data(data_settings, training.global_batch_size, world, rank, 0, device)
    batches = endless(data)

    def step() -> None:
        images, labels, batch_size = next(batches)
        train_step(model, optimizer, accelerator, images, labels, batch_size, 1)

    # One evaluation first, as a training run has had by its second epoch: its large batches
    # raise glibc's mmap threshold, and without that every fp32 step here took about 1,400
    # page faults (5.9-6.4 ms per step instead of 3.7) that a real run never sees.
    evaluate(model, eval_batches(data_settings, world, rank, device), accelerator)
    model.train()
    timed(step, args.warmup, device)
    on_gpu = device.type == "cuda"
    accelerator.wait_for_everyone()
    with profile(activities=[ProfilerActivity.CPU, *[ProfilerActivity.CUDA] * on_gpu]) as prof:
        seconds = timed(step, args.steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        copied, kernel_us = trace_totals(trace)

    top_level, aten_count = aten_ops(prof)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    steps = args.steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    options = ("mixed_precision", "channels_last", "compile")
    result = {
        "device": str(device),
        "world_size": world,
        **{k: getattr(training, k) for k in options},
        "loader": data_settings.loader,
        "global_batch_size": training.global_batch_size,
        "steps": steps,
        "host_ms_per_step": seconds / steps * 1e3,
        "images_per_second": steps * training.global_batch_size / seconds,
        "top_level_ops_per_step": len(top_level) / steps,
        "aten_ops_per_step": aten_count / steps,
        "cuda_kernels_per_step": len(kernels) / steps if on_gpu else None,
        "gpu_kernel_ms_per_step": kernel_us / steps / 1e3 if on_gpu else None,
        "h2d_bytes_per_step": copied / steps if on_gpu else None,
    }
    if args.versus_plain:
        result.update(versus_plain(args, training, data, step, device))
    accelerator.end_training()
    return (result, table) if accelerator.is_main_process else None


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds that ``steps`` calls of ``step`` take, the device synchronised at the ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def endless(data: TrainData) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's batches of epoch 1, 2, ... with each step's global batch size."""
    for epoch in itertools.count(1):
        for i, (images, labels) in enumerate(data.epoch(epoch)):
            yield images, labels, data.sharding.global_batch_size_at(i)


def versus_plain(
    args: argparse.Namespace,
    training: TrainConfig,
    data: TrainData,
    harness_step: Callable[[], None],
    device: torch.device,
) -> dict[str, Any]:
    """Per-step time of ``harness_step`` and row (b)'s bare step, in interleaved rounds."""
    model, optimizer = bare_model_and_optimizer(device, training.channels_last)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=training.mixed_precision == "bf16"
    )
    plain_batches = endless(data)

    def plain_step() -> None:
        images, labels, _ = next(plain_batches)
        bare_step(model, optimizer, images, labels, autocast)

    plain_per_step, harness_per_step = [], []
    for _ in range(args.versus_plain):
        plain_per_step.append(timed(plain_step, args.steps, device) / args.steps)
        harness_per_step.append(timed(harness_step, args.steps, device) / args.steps)
    ratios = [p / h for p, h in zip(plain_per_step, harness_per_step, strict=True)]
    return {
        "versus_plain_rounds": args.versus_plain,
        "plain_ms_per_step": statistics.median(plain_per_step) * 1e3,
        "harness_ms_per_step": statistics.median(harness_per_step) * 1e3,
        "harness_speed_vs_plain": statistics.median(ratios),
        "harness_speed_vs_plain_range": [min(ratios), max(ratios)],
    }


def aten_ops(prof: profile) -> tuple[list[str], int]:
    """The top-level ATen ops a profile saw, by name, and the number of all (nested too)."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = [
        e.name for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
    ]
    return top_level, len(events)


def count_ops(run: Callable[[], None]) -> tuple[list[str], int]:
    """``aten_ops`` of one call of ``run``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return aten_ops(prof)


def captured_step_op_counts(batch_size: int = 64, warmup: int = 3) -> dict[str, Any]:
    """The ops of one captured step of mnist-dist (full batch and short last one) and of row
    (c), run eagerly on the CPU: what their graphs record, one kernel per op at each replay."""
    torch.use_deterministic_algorithms(True)
    try:
        num_samples = 3 * batch_size + batch_size // 8  # three full batches and a short one
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(num_samples, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (num_samples,), generator=generator)
        device = torch.device("cpu")

        model, optimizer = bare_model_and_optimizer(device, capturable=True)
        bare = CapturableStep(model, optimizer, images, labels, batch_size)
        bare.load_epoch(torch.arange(num_samples))
        for _ in range(warmup):
            bare.step_index.zero_()
            bare()
        bare.step_index.zero_()
        optimizer.zero_grad(set_to_none=True)  # as at its capture: the backward writes afresh
        row_c = count_ops(bare)

        accelerator = make_accelerator("no")
        model, optimizer = build_model_and_optimizer(accelerator, TrainConfig(), lr=1e-3)
        sharding = Sharding(num_samples, batch_size, 1, 0, seed=0)
        data = TensorTrainData(images, labels, sharding)
        stats = StepFigures(sharding.steps_per_epoch, device)
        engine = CapturedStep(model, optimizer, None, data, stats, grad_accum=1)
        for epoch in range(1, warmup + 1):  # every kind of step, ``warmup`` times
            for _ in engine.run_epoch(epoch, 0):
                pass
        # The eager form of the captured step (``zero_grad``, which dispatches no op, then the
        # step): the second one (the first also loads the epoch's order), and the last.
        steps = engine.run_epoch(warmup + 1, 0)
        next(steps)
        ours_full = count_ops(lambda: next(steps))
        next(steps)
        ours_short = count_ops(lambda: next(steps))
    finally:
        torch.use_deterministic_algorithms(False)
    counts: dict[str, Any] = {"device": "cpu", "torch": torch.__version__}
    for name, (top, every) in (("row_c", row_c), ("captured", ours_full),
                               ("captured_short_batch", ours_short)):  # fmt: skip
        counts |= {f"{name}_top_level_ops": len(top), f"{name}_aten_ops": every}
    more = {
        op: ours_full[0].count(op) - row_c[0].count(op) for op in sorted({*ours_full[0], *row_c[0]})
    }
    return counts | {"captured_minus_row_c": {op: n for op, n in more.items() if n}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-step profile of mnist-dist's train_step.")
    add_data_dir(parser)
    add = parser.add_argument
    add("--steps", type=int, default=200, help="profiled steps")
    add("--warmup", type=int, default=30, help="untimed steps first")
    add("--batch-size", type=int, default=TrainConfig().global_batch_size, help="global batch")
    add("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    add("--compile", action="store_true")
    add("--loader", choices=["tensor", "torchvision"], default="tensor")
    add("--top", type=int, default=12, help="ops listed by host time")
    add("--versus-plain", type=int, default=0, metavar="N", help="N rounds against the bare step")
    add("--captured-ops", action="store_true", help="count a captured step's ops against (c)")
    add("--json", action="store_true", help="print the summary as JSON only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.captured_ops:
        out = captured_step_op_counts(args.batch_size), None
    elif (out := profile_steps(args)) is None:
        return 0
    summary, table = out
    if args.json:
        print(json.dumps(summary))
        return 0
    if table:
        print(table)
    for key, value in summary.items():
        if isinstance(value, list):
            value = "-".join(f"{v:,.2f}" for v in value)
        print(f"{key:36s} {f'{value:,.2f}' if isinstance(value, float) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
