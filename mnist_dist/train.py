"""A training run as three steps: ``build`` it from a ``Config``, ``fit`` it with the epoch
loop (``loop.py``), ``finish`` it: summary, final weights, the last W&B pass."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LRScheduler

from mnist_dist.checkpoint import Checkpoint, Checkpointer, TrainerState
from mnist_dist.claim import Holder
from mnist_dist.config import Config, TrainConfig
from mnist_dist.console import RunConsole
from mnist_dist.data import build_train_data, ensure_raw_files, eval_batches
from mnist_dist.determinism import set_determinism
from mnist_dist.distributed import describe_processes, make_accelerator, process_group, say
from mnist_dist.engine import build_engine
from mnist_dist.evaluate import evaluate
from mnist_dist.layout import RunLayout
from mnist_dist.loop import Loop
from mnist_dist.model import MnistCNN
from mnist_dist.provenance import provenance
from mnist_dist.records import EpochRecord, Summary
from mnist_dist.resume import Resumption, continue_command, decide
from mnist_dist.rundir import RunDir, claimed, resolve_run_dir
from mnist_dist.schedule import build_schedule
from mnist_dist.stopping import StopControl
from mnist_dist.wandb_tracker import MAX_TABLE_ROWS, Tracker, wants_wandb
from mnist_dist.weights import export_model


def train(config: Config) -> Summary:
    """Train as ``config`` says and return the summary (also written to ``summary.json``).
    Raises ``Stopped`` (resumable), ``DivergedError``, ``WriteError`` or ``UsageError``."""
    started = time.perf_counter()
    determinism = set_determinism(config.train.deterministic)  # before the first CUDA call
    log_with = "wandb" if wants_wandb(config.tracking) else None
    accelerator = make_accelerator(
        config.train.mixed_precision, log_with=log_with, static_graph=config.train.grad_accum == 1
    )
    with process_group(accelerator):  # destroyed on every rank at the end
        # Checked before the run directory is touched: the batch divides, the data is intact.
        config.train.per_device_batch_size(accelerator.num_processes)  # raises if it does not
        ensure_raw_files(accelerator, config.data)
        layout = resolve_run_dir(accelerator, config.train.output_dir, config.checkpoint.resume)
        with claimed(accelerator, layout) as holder:  # one training per run directory
            run = build(accelerator, config, layout, holder, started, determinism)
            if isinstance(run, Summary):
                return run  # the run directory holds a finished run: nothing to do
            with run.status():
                run.fit(config.train.epochs)
                summary = finish(run, config)
            say(
                f"done: test accuracy {summary.test_accuracy:.2%} ({summary.test_correct}/"
                f"{summary.test_total}) after {summary.epochs_completed} epoch(s), "
                f"{summary.images_per_second:,.0f} images/s, "
                f"{summary.segment_wall_seconds:.0f}s"
                + (f" ({summary.run_wall_seconds:.0f}s over the run)" if run.resumed else "")
                + f"; weights in {layout.model}"
            )
            return summary


def build(
    accelerator: Accelerator,
    config: Config,
    layout: RunLayout,
    holder: Holder | None,
    started: float,
    determinism: dict[str, Any],
) -> Loop | Summary:
    """The run, restored from its checkpoint if any; or the finished run's summary if done."""
    training, checkpointing = config.train, config.checkpoint
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    command = continue_command(layout.root, checkpointing.resume)
    run_dir = RunDir(layout, accelerator.is_main_process, holder, command)
    train_data = build_train_data(
        config.data, training.global_batch_size, world, rank, training.seed, device
    )
    steps_per_epoch = train_data.sharding.steps_per_epoch
    console = RunConsole(accelerator.is_main_process, training, steps_per_epoch)
    console.status("looking for a checkpoint")
    resumption = decide(run_dir, config, accelerator)
    if resumption.finished is not None:
        console.close()
        return resumption.finished
    checkpoint = resumption.checkpoint
    console.status("building the model" + (" and loading the checkpoint" if checkpoint else ""))
    num_samples = train_data.sharding.num_samples
    model, optimizer, schedule, state = build_training(accelerator, config, num_samples, resumption)
    keep, every = checkpointing.keep_checkpoints, checkpointing.checkpoint_every
    checkpointer = Checkpointer(accelerator, run_dir.layout, keep, every, started)
    if checkpoint is not None:
        checkpointer.earlier_wall_seconds = state.run_wall_seconds
        run_dir.restore_records(state.history, state.global_step)
    # After the resume: a capture records the addresses of the restored optimizer state.
    engine, figures, reason = build_engine(
        training.cuda_graph, model, optimizer, accelerator, train_data, training.grad_accum
    )
    tracking = wants_wandb(config.tracking)
    console.status("starting the tracker" if tracking else "writing config.yaml")
    launch = {**provenance(accelerator), **determinism, "step_engine": engine.name}
    tracker = start(accelerator, config, run_dir, state, checkpoint, launch, reason)
    console.status("loading the test set")
    return Loop(
        accelerator=accelerator,
        model=model,
        schedule=schedule,
        engine=engine,
        figures=figures,
        sharding=train_data.sharding,
        test_data=eval_batches(config.data, world, rank, device),
        checkpointer=checkpointer,
        stop=StopControl(accelerator, run_dir.layout.stop),
        files=run_dir,
        tracker=tracker,
        console=console,
        log_every=training.log_every,
        state=state,
        resumed=checkpoint is not None,
    )


def build_training(
    accelerator: Accelerator, config: Config, num_samples: int, resumption: Resumption
) -> tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler, TrainerState]:
    """The model, optimizer, LR schedule and trainer state, restored from the chosen checkpoint."""
    training = config.train
    set_seed(training.seed)  # the same initial weights on every rank and world size
    model, optimizer = build_model_and_optimizer(accelerator, training, config.optim.lr)
    schedule = build_schedule(optimizer, config.optim)
    state = TrainerState(
        seed=training.seed,
        global_batch_size=training.global_batch_size,
        num_samples=num_samples,
        world_size=accelerator.num_processes,
        config=config.to_dict(),
    )
    if resumption.checkpoint is not None:
        state = resumption.restore(accelerator, state, schedule)
    return model, optimizer, schedule, state


def start(
    accelerator: Accelerator,
    config: Config,
    run_dir: RunDir,
    state: TrainerState,
    checkpoint: Checkpoint | None,
    launch: dict[str, Any],
    reason: str,
) -> Tracker:
    """Write ``config.yaml`` (settings and provenance), start the tracker (a resumed run
    continues its W&B run) and print the start-up lines."""
    if checkpoint is not None:
        launch["resumed_at"] = launch["started_at"]
    # The first start's time describes the run; a branch is a run of its own.
    launch["started_at"] = state.started_at = state.started_at or launch["started_at"]
    launch["resumed_from"] = str(checkpoint.path) if checkpoint else None
    launch["branched_from"] = state.branched_from
    settings = config.to_dict()
    run_dir.write_config(settings, launch)
    tracker = Tracker(
        config.tracking, accelerator, run_dir.layout, {**settings, "provenance": launch},
        run_id=state.tracker_run_id,
    )  # fmt: skip
    state.tracker_run_id = tracker.run_id or state.tracker_run_id
    say(
        f"mnist-dist: {describe_processes(accelerator)}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}, "
        f"global batch {config.train.global_batch_size} "
        f"({config.train.per_device_batch_size(accelerator.num_processes)} per process), "
        f"{state.num_samples} training images, run dir {run_dir.path}"
    )
    mode = "on" if config.train.deterministic else "off (--no-deterministic)"
    say(f"step engine: {launch['step_engine']} ({reason}); deterministic algorithms {mode}")
    return tracker


def finish(run: Loop, config: Config) -> Summary:
    """Write the summary and the final weights, and send the final W&B pass."""
    accelerator, state, training = run.accelerator, run.state, config.train
    run.console.close()  # the bar goes before the final lines
    history = [EpochRecord.from_dict(r) for r in state.history]
    last, best = history[-1], max(history, key=lambda r: r.test_accuracy)
    train_seconds = sum(r.train_seconds for r in history)
    # This command's time, and the run's: summed over every process that trained it (each up
    # to its last checkpoint: work lost to a kill is not counted).
    segment_wall_seconds = time.perf_counter() - run.checkpointer.started
    summary = Summary(
        test_accuracy=last.test_accuracy,
        test_correct=last.test_correct,
        test_total=last.test_total,
        test_loss=last.test_loss,
        best_test_accuracy=best.test_accuracy,
        best_epoch=best.epoch,
        train_loss=last.train_loss,
        train_accuracy=last.train_accuracy,
        world_size=accelerator.num_processes,
        distributed_type=accelerator.distributed_type.value,
        mixed_precision=accelerator.mixed_precision,
        global_batch_size=training.global_batch_size,
        per_device_batch_size=training.per_device_batch_size(accelerator.num_processes),
        epochs_completed=len(history),
        global_step=last.global_step,
        images_per_second=state.num_samples * len(history) / train_seconds,
        step_engine=run.engine.name,
        deterministic=training.deterministic,
        segment_wall_seconds=segment_wall_seconds,
        run_wall_seconds=run.checkpointer.earlier_wall_seconds + segment_wall_seconds,
        started_at=state.started_at,
        run_dir=str(run.files.path),
    )
    model, weights = run.model, run.files.layout.model
    if accelerator.is_main_process:
        meta = {"mnist_dist_version": metadata.version("mnist-dist"), "summary": summary.to_dict()}
        export_model(accelerator.unwrap_model(model), weights, meta)
    run.files.write_summary(summary)
    if wants_wandb(config.tracking):  # the same on every rank: the final pass is collective
        final = evaluate(model, run.test_data, accelerator, max_misclassified=MAX_TABLE_ROWS)
        run.tracker.log_final(summary, final, weights)
    return summary


def build_model_and_optimizer(
    accelerator: Accelerator, training: TrainConfig, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The reference CNN and Adam, on the device, with the speed options, prepared."""
    model = MnistCNN().to(accelerator.device)
    if training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The fused kernel updates every parameter in one pass: one launch per step on CUDA, and on
    # this CPU 100 us per step instead of 340 us for the default per-parameter loop.
    fused = True if accelerator.device.type in ("cuda", "cpu") else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    if training.compile:
        model.compile()  # in place: state_dict keys (and so checkpoints) stay the same
    return accelerator.prepare(model, optimizer)
