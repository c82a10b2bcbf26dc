"""Build everything from a ``Config``, run the epoch loop, write the run directory."""

from __future__ import annotations

import time
from contextlib import nullcontext
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import MultiStepLR

from mnist_dist.checkpoint import export_model
from mnist_dist.config import Config
from mnist_dist.data import TrainData, build_train_data, ensure_raw_files, eval_batches
from mnist_dist.distributed import make_accelerator, provenance
from mnist_dist.evaluate import evaluate
from mnist_dist.model import MnistCNN
from mnist_dist.rundir import RunDir, resolve_run_dir
from mnist_dist.tracking import MAX_TABLE_ROWS, RunConsole, RunOutputs, make_tracker, wants_wandb


def train(config: Config) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (also written to ``summary.json``)."""
    started = time.perf_counter()
    log_with = "wandb" if wants_wandb(config.tracking) else None
    accelerator = make_accelerator(config.train.mixed_precision, log_with=log_with)
    try:
        return _train(accelerator, config, started)
    finally:
        accelerator.end_training()  # destroys the process group on every rank


def _train(accelerator: Accelerator, config: Config, started: float) -> dict[str, Any]:
    tc, dc, oc = config.train, config.data, config.optim
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    per_device_batch_size = tc.per_device_batch_size(world)  # raises if it does not divide
    ensure_raw_files(accelerator, dc)  # verified (or downloaded) before anything is written
    run_dir = RunDir(resolve_run_dir(accelerator, tc.output_dir), accelerator.is_main_process)

    set_seed(tc.seed)  # the same initial weights on every rank and world size
    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=oc.lr)
    # Stepped once per epoch by us and never prepared (huggingface/accelerate#2926).
    scheduler = MultiStepLR(optimizer, milestones=list(oc.lr_milestones), gamma=oc.lr_gamma)
    model, optimizer = accelerator.prepare(model, optimizer)

    train_data = build_train_data(dc, tc.global_batch_size, world, rank, tc.seed, device)
    test_data = eval_batches(dc, world, rank, device)

    resolved, launch = config.to_dict(), provenance(accelerator)
    run_dir.write_config(resolved, launch)
    console = RunConsole(
        accelerator.is_main_process, tc.epochs, train_data.sharding.steps_per_epoch
    )
    tracker = make_tracker(
        config.tracking, accelerator, run_dir.path, {**resolved, "provenance": launch},
        console.print,
    )  # fmt: skip
    outputs = RunOutputs(run_dir, tracker, console)
    console.print(
        f"mnist-dist: {world} process(es), {accelerator.distributed_type.value}, "
        f"device {device}, mixed precision {accelerator.mixed_precision}, "
        f"global batch {tc.global_batch_size} ({per_device_batch_size} per process), "
        f"{train_data.sharding.num_samples} training images, run dir {run_dir.path}"
    )

    history: list[dict[str, Any]] = []
    global_step = 0
    try:
        for epoch in range(1, tc.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            console.start_epoch(epoch)
            epoch_start = time.perf_counter()
            train_loss, train_accuracy, global_step = train_epoch(
                model, optimizer, accelerator, train_data, epoch, global_step, tc.grad_accum,
                tc.log_every, outputs,
            )  # fmt: skip
            train_seconds = time.perf_counter() - epoch_start
            result = evaluate(model, test_data, accelerator)
            scheduler.step()
            record = {
                "epoch": epoch,
                "global_step": global_step,
                "lr": lr,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "test_loss": result.loss,
                "test_accuracy": result.accuracy,
                "test_correct": result.correct,
                "test_total": result.total,
                "train_seconds": train_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "images_per_second": train_data.sharding.num_samples / train_seconds,
            }
            history.append(record)
            outputs.record_epoch(record)
    finally:
        console.close()

    summary = summarize(
        history, accelerator, train_data.sharding.num_samples, tc.global_batch_size,
        per_device_batch_size,
    )  # fmt: skip
    summary["wall_seconds"] = time.perf_counter() - started
    summary["run_dir"] = str(run_dir.path)
    if accelerator.is_main_process:
        export_model(
            accelerator.unwrap_model(model),
            run_dir.model_path,
            {"mnist_dist_version": metadata.version("mnist-dist"), "summary": summary},
        )
    run_dir.write_summary(summary)
    if wants_wandb(config.tracking):  # the same on every rank: the final pass is collective
        final = evaluate(model, test_data, accelerator, max_misclassified=MAX_TABLE_ROWS)
        tracker.log_final(summary, final, run_dir.model_path)
    tracker.finish()
    console.print(
        f"done: test accuracy {summary['test_accuracy']:.2%} "
        f"({summary['test_correct']}/{summary['test_total']}) after {summary['epochs_completed']} "
        f"epoch(s), {summary['images_per_second']:,.0f} images/s, {summary['wall_seconds']:.0f}s; "
        f"weights in {run_dir.model_path}"
    )
    return summary


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    data: TrainData,
    epoch: int,
    global_step: int,
    grad_accum: int,
    log_every: int,
    outputs: RunOutputs,
) -> tuple[float, float, int]:
    """One pass over the training set. Returns (mean loss, accuracy, global step), all ranks
    together, measured on the training forward passes."""
    model.train()
    sharding = data.sharding
    # (loss sum, correct) of this rank's images, kept on the device: no per-step host sync.
    epoch_sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    logged_sums, window_images, window_start = epoch_sums.clone(), 0, time.perf_counter()
    for step, (images, labels) in enumerate(data.epoch(epoch)):
        batch = sharding.global_batch_size_at(step)
        epoch_sums += train_step(model, optimizer, accelerator, images, labels, batch, grad_accum)
        window_images += batch
        global_step += 1
        outputs.console.advance()
        if global_step % log_every == 0:
            # A collective and a host sync, once per log_every steps.
            window_sums = epoch_sums - logged_sums
            loss_sum = accelerator.reduce(window_sums, reduction="sum")[0].item()
            seconds = time.perf_counter() - window_start
            outputs.record_step(
                {
                    "global_step": global_step,
                    "epoch": epoch,
                    "train_loss": loss_sum / window_images,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_second": window_images / seconds,
                }
            )
            logged_sums = epoch_sums.clone()
            window_images, window_start = 0, time.perf_counter()
    loss_sum, correct = accelerator.reduce(epoch_sums, reduction="sum").tolist()
    return loss_sum / sharding.num_samples, correct / sharding.num_samples, global_step


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images: torch.Tensor,
    labels: torch.Tensor,
    global_batch_size: int,
    grad_accum: int,
) -> torch.Tensor:
    """One optimizer step on this rank's share of a global batch, in ``grad_accum`` micro-batches.

    The loss is this rank's summed cross-entropy times world_size / global_batch_size: DDP then
    averages over ranks, so the gradient is exactly that of the mean loss over the global batch,
    whatever the world size, the accumulation or an uneven last batch. Returns this rank's
    (summed loss, correct predictions) on the device.
    """
    scale = accelerator.num_processes / global_batch_size
    sums = torch.zeros(2, device=images.device, dtype=torch.float64)
    micro_batches = list(
        zip(images.tensor_split(grad_accum), labels.tensor_split(grad_accum), strict=True)
    )
    for i, (x, y) in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch.
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            accelerator.backward(loss * scale)
        sums[0] += loss.detach()
        sums[1] += (logits.argmax(dim=1) == y).sum()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def summarize(
    history: list[dict[str, Any]],
    accelerator: Accelerator,
    images_per_epoch: int,
    global_batch_size: int,
    per_device_batch_size: int,
) -> dict[str, Any]:
    """The final figures of a run, for ``summary.json``."""
    last = history[-1]
    best = max(history, key=lambda r: r["test_accuracy"])
    train_images = images_per_epoch * len(history)
    return {
        "test_accuracy": last["test_accuracy"],
        "test_correct": last["test_correct"],
        "test_total": last["test_total"],
        "test_loss": last["test_loss"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": global_batch_size,
        "per_device_batch_size": per_device_batch_size,
        "epochs_completed": len(history),
        "global_step": last["global_step"],
        "images_per_second": train_images / sum(r["train_seconds"] for r in history),
    }
