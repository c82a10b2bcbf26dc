"""Creating the Accelerator and proving the process group it formed."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, InitProcessGroupKwargs

from mnist_dist.errors import UsageError

COLLECTIVE_TIMEOUT_ENV = "MNIST_DIST_COLLECTIVE_TIMEOUT"


def collective_timeout() -> timedelta | None:
    """``MNIST_DIST_COLLECTIVE_TIMEOUT`` (seconds): how long a rank waits in a collective or at
    the rendezvous for a peer that vanished without closing its connections (a dead node, a cut
    network; a peer that exits is noticed at once). None: PyTorch's default (30 min for gloo)."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?", value) or float(value) <= 0:
        raise UsageError(f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return timedelta(seconds=float(value))


def check_precision(mixed_precision: str, cuda_gpus: int) -> str:
    """``mixed_precision``, if a node with ``cuda_gpus`` CUDA GPUs can train in it; else a
    ``UsageError`` that says what to use instead."""
    if mixed_precision == "fp16" and not cuda_gpus:
        # Autocast to fp16 is silently ignored on CPU (native AMP needs a non-CPU device), so
        # a run would report fp16 while training in fp32.
        raise UsageError(
            "--mixed-precision fp16 needs a CUDA GPU and this node has none; "
            "use --mixed-precision bf16 (works on CPU) or no"
        )
    bf16_gpu = mixed_precision == "bf16" and cuda_gpus > 0 and torch.cuda.is_available()
    if bf16_gpu and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise UsageError(f"--mixed-precision bf16 is not supported by {name}; use fp16 or no")
    return mixed_precision


def make_accelerator(
    mixed_precision: str, log_with: str | None = None, static_graph: bool = False
) -> Accelerator:
    """An Accelerator on the best available device whose world size is proven to be the
    launcher's; ``UsageError`` for a mis-configured launch."""
    # `accelerate launch --cpu --num_processes N` (and MULTI_CPU configs) start ONE process
    # without WORLD_SIZE, expecting mpirun; its only trace is MASTER_ADDR, which the launcher
    # sets only when asked for more than one process (seen with accelerate 1.15).
    env = os.environ
    launched = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env
    mpi = any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if launched and "WORLD_SIZE" not in env and not mpi:
        raise UsageError(
            "accelerate launch was asked for several processes but started one (its --cpu "
            "multi-process path needs mpirun); launch with --config_file "
            "accelerate_configs/cpu_ddp.yaml instead"
        )
    check_precision(mixed_precision, torch.cuda.device_count())
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
        static_graph=static_graph,
    )
    # Autocast's weight cache must be off for a forward captured in a CUDA graph (PyTorch's
    # CUDA graphs notes); each weight is cast once per forward here, so it saves nothing.
    autocast = AutocastKwargs(cache_enabled=False)
    handlers: list = [ddp, autocast]
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if (timeout := collective_timeout()) is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        # Without cpu=True, `accelerate launch --multi_gpu` on a machine without GPUs starts N
        # lone rank-0 processes (DistributedType.NO) that train independently.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available() or xpu),
        mixed_precision=mixed_precision,
        log_with=log_with,
        # We step the epoch scheduler ourselves and never prepare it: a prepared scheduler steps
        # num_processes times per call (huggingface/accelerate#2926).
        step_scheduler_with_optimizer=False,
    )
    check_world_size(accelerator)
    return accelerator


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says that another rank vanished (its process, node or network). Gloo
    reports it as a plain RuntimeError from its TCP transport, c10d as ``DistError``."""
    gloo = isinstance(error, RuntimeError) and "gloo/transport/" in str(error)
    return gloo or isinstance(error, getattr(torch.distributed, "DistError", ()))


def check_world_size(accelerator: Accelerator) -> None:
    """Fail unless the process group has exactly the launcher's WORLD_SIZE members."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    formed = accelerator.num_processes
    if formed == expected and formed > 1:
        # Prove it with a collective: every member adds one.
        formed = int(accelerator.reduce(torch.ones(1, device=accelerator.device), "sum").item())
    if formed != expected:
        raise UsageError(
            f"the launcher started WORLD_SIZE={expected} processes but Accelerate formed a "
            f"group of {formed} ({accelerator.distributed_type.value}); no accelerator was "
            "found, so launch with --config_file accelerate_configs/cpu_ddp.yaml"
        )


def describe_processes(accelerator: Accelerator) -> str:
    """The process group in words: "single process", "2 processes (DDP, gloo)"."""
    world = accelerator.num_processes
    if world == 1:
        return "single process"
    kind = accelerator.distributed_type.value
    kind = "DDP" if kind.startswith("MULTI_") else kind  # MULTI_GPU, MULTI_CPU, ...: plain DDP
    # A backend per device type reads "cuda:nccl,cpu:gloo": name the one of our device.
    parts = (getattr(accelerator.state, "backend", None) or "").split(",")
    backends = dict(p.split(":", 1) if ":" in p else (accelerator.device.type, p) for p in parts)
    backend = backends.get(accelerator.device.type)
    return f"{world} processes ({kind}{', ' + backend if backend else ''})"


def say(line: str) -> None:
    """Tell the user ``line``: printed by the main process only, so that it shows once."""
    if PartialState().is_main_process:
        print(line, flush=True)


@contextmanager
def process_group(accelerator: Accelerator) -> Iterator[Accelerator]:
    """Run the block, then destroy the process group on every rank, after a barrier if the block
    ended normally: in torch 2.6 a gloo group's destructor holds the GIL while it joins worker
    threads that may need it; about one two-rank CPU run in seven hung (pytorch/pytorch#56297)."""
    try:
        yield accelerator
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
