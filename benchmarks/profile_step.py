"""Per-step cost of mnist-dist's training step, so that a regression is visible.

Builds the model, optimizer and input pipeline exactly as ``mnist-dist train`` does (the same
functions), runs warm-up steps, then profiles ``--steps`` steps of ``train_step`` with
``torch.profiler`` and prints:

* host time per step (wall clock, device synchronised at the ends only),
* operators per step: ATen ops the step dispatches (top level, and all including nested ones),
* CUDA kernels per step (on a GPU),
* host-to-device bytes per step (CUDA memcpy HtoD, read from the profiler trace; on a CPU there
  is no separate device memory, so none),
* the ops that take the most host time.

Run from the repository root, e.g.::

    python benchmarks/profile_step.py --data-dir ../shared/data --steps 200
    python benchmarks/profile_step.py --steps 200 --mixed-precision bf16 --no-channels-last
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml benchmarks/profile_step.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mnist_dist.config import DataConfig, TrainConfig
from mnist_dist.data import build_train_data, ensure_raw_files
from mnist_dist.distributed import make_accelerator
from mnist_dist.train import build_model_and_optimizer, train_step


def h2d_bytes(trace_path: Path) -> int:
    """Bytes copied host-to-device in a profiler (Chrome) trace."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    return sum(
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    )


def profile_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Profile ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    tc = TrainConfig(
        global_batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    dc = DataConfig(data_dir=args.data_dir, loader=args.loader)
    accelerator = make_accelerator(tc.mixed_precision, static_graph=True)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    tc.per_device_batch_size(world)
    ensure_raw_files(accelerator, dc)
    model, optimizer = build_model_and_optimizer(accelerator, tc, lr=1e-3)
    data = build_train_data(dc, tc.global_batch_size, world, rank, 0, device)
    batches = iter(data.epoch(1))
    sharding = data.sharding
    total = args.warmup + args.steps
    if total > sharding.steps_per_epoch:
        raise SystemExit(f"--warmup + --steps must be <= {sharding.steps_per_epoch} (one epoch)")

    def step(i: int) -> None:
        images, labels = next(batches)
        train_step(
            model, optimizer, accelerator, images, labels, sharding.global_batch_size_at(i), 1
        )

    model.train()
    for i in range(args.warmup):
        step(i)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    accelerator.wait_for_everyone()
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(args.warmup, total):
            step(i)
        _sync(device)
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        copied = h2d_bytes(trace)

    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = [
        e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
    ]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    steps = args.steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    result = {
        "device": str(device),
        "world_size": world,
        "mixed_precision": tc.mixed_precision,
        "channels_last": tc.channels_last,
        "compile": tc.compile,
        "loader": dc.loader,
        "global_batch_size": tc.global_batch_size,
        "steps": steps,
        "host_ms_per_step": seconds / steps * 1e3,
        "images_per_second": steps * tc.global_batch_size / seconds,
        "top_level_ops_per_step": len(top_level) / steps,
        "aten_ops_per_step": len(events) / steps,
        "cuda_kernels_per_step": len(kernels) / steps if device.type == "cuda" else None,
        "h2d_bytes_per_step": copied / steps if device.type == "cuda" else None,
    }
    accelerator.end_training()
    return {"summary": result, "table": table, "main": accelerator.is_main_process}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-step profile of mnist-dist's train_step.")
    parser.add_argument(
        "--data-dir", default=os.environ.get("MNIST_DIST_DATA_DIR", "./data"), help="MNIST root"
    )
    parser.add_argument("--steps", type=int, default=200, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--loader", choices=["tensor", "torchvision"], default="tensor")
    parser.add_argument("--top", type=int, default=12, help="ops listed by host time")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = profile_steps(args)
    if not out["main"]:
        return 0
    summary = out["summary"]
    if args.json:
        print(json.dumps(summary))
        return 0
    print(out["table"])
    for key, value in summary.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else value
        print(f"{key:24s} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
