"""Build everything from a ``Config``, run the epoch loop, write the run directory."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import MultiStepLR

from mnist_dist.checkpoint import (
    Checkpoint,
    Checkpointer,
    TrainerState,
    complete_checkpoints,
    export_model,
    restore_checkpoint,
)
from mnist_dist.config import Config, TrainConfig
from mnist_dist.data import Sharding, build_train_data, ensure_raw_files, eval_batches
from mnist_dist.determinism import set_determinism
from mnist_dist.distributed import describe_processes, make_accelerator, provenance
from mnist_dist.engine import (
    EpochStats,
    StepEngine,
    build_engine,
    lr_value,
    stepped_optimizer,
)
from mnist_dist.errors import DivergedError, Stopped, UsageError, WriteError
from mnist_dist.evaluate import EvalResult, evaluate
from mnist_dist.layout import STOP_FILE
from mnist_dist.model import MnistCNN
from mnist_dist.rundir import RunDir, read_config, resolve_run_dir
from mnist_dist.stopping import StopControl
from mnist_dist.tracking import MAX_TABLE_ROWS, RunConsole, RunOutputs, make_tracker, wants_wandb


def train(config: Config) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (also written to ``summary.json``).

    Raises ``Stopped`` after a stop request (checkpoint saved, resumable), ``DivergedError`` on
    a non-finite loss, ``WriteError`` when run state cannot be written, ``UsageError`` for bad
    input.
    """
    started = time.perf_counter()
    determinism = set_determinism(config.train.deterministic)  # before the first CUDA call
    log_with = "wandb" if wants_wandb(config.tracking) else None
    accelerator = make_accelerator(
        config.train.mixed_precision, log_with=log_with, static_graph=config.train.grad_accum == 1
    )
    try:
        return _train(accelerator, config, started, determinism)
    finally:
        accelerator.end_training()  # destroys the process group on every rank


def _train(
    accelerator: Accelerator, config: Config, started: float, determinism: dict[str, Any]
) -> dict[str, Any]:
    tc, dc, oc, cc = config.train, config.data, config.optim, config.checkpoint
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    per_device_batch_size = tc.per_device_batch_size(world)  # raises if it does not divide
    ensure_raw_files(accelerator, dc)  # verified (or downloaded) before anything is written
    run_path = resolve_run_dir(accelerator, tc.output_dir, cc.resume)
    run_dir = RunDir(run_path, accelerator.is_main_process)
    train_data = build_train_data(dc, tc.global_batch_size, world, rank, tc.seed, device)
    test_data = eval_batches(dc, world, rank, device)
    sharding = train_data.sharding
    console = RunConsole(accelerator.is_main_process, tc.epochs, sharding.steps_per_epoch)
    checkpointer = Checkpointer(accelerator, run_dir.path, cc.keep_checkpoints, started)
    checkpoint = checkpointer.find(cc.resume, console.print)
    branch = checkpoint is not None and not checkpointer.holds(checkpoint)
    if (checkpoint is None or branch) and run_dir.holds_records():
        raise UsageError(
            f"{run_dir.path} already holds a run and no intact checkpoint to resume "
            f"(--resume {cc.resume}); choose another --output-dir"
        )
    resolved = config.to_dict()
    if checkpoint is not None:  # before anything is written
        checkpoint.check_settings(resolved, run_dir.path, branch, console.print)
    finished = None if branch else run_dir.finished_summary()
    if finished is not None:
        done = finished["epochs_completed"]
        if tc.epochs <= done:  # the same command again: nothing to do, nothing rewritten
            console.print(
                f"mnist-dist: {run_dir.path} holds a finished run: {done} epoch(s), test "
                f"accuracy {finished['test_accuracy']:.2%}; summary in {run_dir.summary_path}; "
                f"pass --epochs above {done} to train it further"
            )
            console.close()
            return finished
        console.print(f"note: {run_dir.path} finished {done} epoch(s); training on to {tc.epochs}")

    set_seed(tc.seed)  # the same initial weights on every rank and world size
    model, optimizer = build_model_and_optimizer(accelerator, tc, oc.lr)
    scheduler = epoch_lr_scheduler(optimizer, oc.lr_milestones, oc.lr_gamma)
    state = TrainerState(
        seed=tc.seed,
        global_batch_size=tc.global_batch_size,
        num_samples=sharding.num_samples,
        world_size=world,
        config=resolved,
    )
    if checkpoint is not None:
        state = resume(accelerator, checkpoint, state, scheduler, console.print, tc.epochs, branch)
        checkpointer.earlier_wall_seconds = state.run_wall_seconds
        run_dir.restore_records(state.history, state.global_step)

    # After the resume: a capture records the addresses of the restored optimizer state.
    engine, stats, engine_reason = build_engine(
        tc.cuda_graph, model, optimizer, accelerator, train_data, tc.grad_accum, console.print
    )

    launch = provenance(accelerator)
    if checkpoint is not None:
        launch["resumed_at"] = launch["started_at"]
    # The first start's time describes the run; a branch is a run of its own.
    launch["started_at"] = state.started_at = state.started_at or launch["started_at"]
    launch["resumed_from"] = str(checkpoint.path) if checkpoint else None
    launch["branched_from"] = state.branched_from
    launch.update(determinism, step_engine=engine.name)
    run_dir.write_config(resolved, launch)
    # A resumed run continues its W&B run: the id comes from the checkpoint (or the run dir).
    tracker = make_tracker(
        config.tracking, accelerator, run_dir.path, {**resolved, "provenance": launch},
        console.print, run_id=state.tracker_run_id,
    )  # fmt: skip
    state.tracker_run_id = tracker.run_id or state.tracker_run_id
    outputs = RunOutputs(run_dir, tracker, console)
    console.print(
        f"mnist-dist: {describe_processes(accelerator)}, "
        f"device {device}, mixed precision {accelerator.mixed_precision}, "
        f"global batch {tc.global_batch_size} ({per_device_batch_size} per process), "
        f"{sharding.num_samples} training images, run dir {run_dir.path}"
    )
    console.print(
        f"step engine: {engine.name} ({engine_reason}); deterministic algorithms "
        f"{'on' if tc.deterministic else 'off (--no-deterministic)'}"
    )

    trainer = Trainer(
        accelerator, model, optimizer, scheduler, engine, stats, sharding, checkpointer,
        StopControl(accelerator, run_dir.path / STOP_FILE), outputs, tc.log_every,
        cc.checkpoint_every,
    )  # fmt: skip
    run_dir.write_status("running", epoch=state.epoch, step=state.step)
    try:
        with trainer.stop.handling_signals():
            while state.epoch <= tc.epochs:
                console.start_epoch(state.epoch, completed=state.step)
                lr = current_lr(optimizer)
                trainer.train_epoch(state)  # raises Stopped or DivergedError
                eval_start = time.perf_counter()
                result = evaluate(model, test_data, accelerator)
                scheduler.step()
                record = trainer.end_epoch(state, result, lr, time.perf_counter() - eval_start)
                outputs.record_epoch(record)
                trainer.save(state)
                if state.epoch <= tc.epochs and trainer.stop.now():  # not after the last epoch
                    trainer.stopped(state)
        console.close()  # the bar goes before the final lines
        summary = summarize(
            state.history, accelerator, sharding.num_samples, tc.global_batch_size,
            per_device_batch_size,
        )  # fmt: skip
        summary["step_engine"], summary["deterministic"] = engine.name, tc.deterministic
        # This command's time, and the run's: summed over every process that trained it (each
        # up to its last checkpoint: work lost to a kill is not counted).
        summary["segment_wall_seconds"] = time.perf_counter() - started
        summary["run_wall_seconds"] = (
            checkpointer.earlier_wall_seconds + summary["segment_wall_seconds"]
        )
        summary["started_at"] = state.started_at
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
        run_dir.write_status("finished", epoch=state.epoch - 1, global_step=state.global_step)
        tracker.finish()
        console.print(
            f"done: test accuracy {summary['test_accuracy']:.2%} ({summary['test_correct']}/"
            f"{summary['test_total']}) after {summary['epochs_completed']} epoch(s), "
            f"{summary['images_per_second']:,.0f} images/s, "
            f"{summary['segment_wall_seconds']:.0f}s"
            + (f" ({summary['run_wall_seconds']:.0f}s over the run)" if checkpoint else "")
            + f"; weights in {run_dir.model_path}"
        )
    except (Stopped, DivergedError, WriteError) as e:
        state_name = {Stopped: "stopped", DivergedError: "diverged"}.get(type(e), "failed")
        run_dir.write_status(state_name, message=str(e), exit_code=e.exit_code)
        tracker.finish()
        if isinstance(e, (Stopped, DivergedError)):
            # Every rank raised this at the same step: leave together, so that the first
            # launcher to exit (srun --kill-on-bad-exit ends the job's other nodes) cannot cut
            # the main process's status.json and W&B writes short.
            accelerator.wait_for_everyone()
        raise
    except BaseException as e:  # a second Ctrl-C, or a bug: say so to whoever watches
        run_dir.write_status("failed", message=f"{type(e).__name__}: {e}")
        raise
    finally:
        trainer.stop.close()
        console.close()
    return summary


def build_model_and_optimizer(
    accelerator: Accelerator, tc: TrainConfig, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The reference CNN and Adam, on the device, with the speed options, prepared."""
    model = MnistCNN().to(accelerator.device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The fused kernel updates every parameter in one pass: one launch per step on CUDA, and on
    # this CPU 100 us per step instead of 340 us for the default per-parameter loop.
    fused = True if accelerator.device.type in ("cuda", "cpu") else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    if tc.compile:
        model.compile()  # in place: state_dict keys (and so checkpoints) stay the same
    return accelerator.prepare(model, optimizer)


def resume(
    accelerator: Accelerator,
    checkpoint: Checkpoint,
    fresh: TrainerState,
    scheduler: MultiStepLR,
    say: Callable[[str], None],
    epochs: int,
    branch: bool = False,
) -> TrainerState:
    """Load ``checkpoint`` into the prepared model and optimizer and return its trainer state.

    A mid-epoch checkpoint continues the same permutation at the next batch, so it needs the
    same seed, global batch and training set; one taken at an epoch boundary can continue
    with any world size (the global batch, not the per-process batch, fixes the math). The
    checkpoint must not be past the end of ``epochs``. A ``branch`` (a new run directory) is a
    run of its own: it keeps the weights and position, not the first run's start.
    """
    state = checkpoint.state
    trained = state.epoch - 1 if state.step == 0 else state.epoch  # whole or partial epochs
    if epochs < trained:
        raise UsageError(
            f"checkpoint {checkpoint.path} has trained past --epochs {epochs} (it resumes at "
            f"epoch {state.epoch}, step {state.step}): pass --epochs {trained} or more"
        )
    if state.step > 0:
        for name, flag in (
            ("seed", "--seed"),
            ("global_batch_size", "--batch-size"),
            ("num_samples", "--max-train-samples"),
        ):
            if getattr(state, name) != getattr(fresh, name):
                raise UsageError(
                    f"checkpoint {checkpoint.path} was taken mid-epoch with {name} "
                    f"{getattr(state, name)}, this run has {getattr(fresh, name)}: resume with "
                    f"the same {flag}, or from a checkpoint at an epoch boundary"
                )
    for note in restore_checkpoint(accelerator, checkpoint):
        say(note)
    scheduler.load_state_dict({**scheduler.state_dict(), **state.scheduler})
    if branch:  # the restored optimizer holds the first run's LR: follow this run's schedule
        decays = bisect_right(sorted(scheduler.milestones.elements()), scheduler.last_epoch)
        lrs = [base * scheduler.gamma**decays for base in scheduler.base_lrs]
        for group, base, lr in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, lrs, strict=True
        ):
            group["initial_lr"], group["lr"] = base, lr
        scheduler.load_state_dict({**scheduler.state_dict(), "_last_lr": lrs})
    if state.world_size != fresh.world_size:
        say(
            f"note: {checkpoint.path.name} was saved by {state.world_size} process(es), "
            f"resuming on {fresh.world_size}: results stay within noise, not bit for bit"
        )
    state.seed, state.global_batch_size = fresh.seed, fresh.global_batch_size
    state.num_samples, state.world_size = fresh.num_samples, fresh.world_size
    state.config = fresh.config
    if branch:
        state.started_at, state.run_wall_seconds = fresh.started_at, fresh.run_wall_seconds
        state.branched_from = str(checkpoint.path)
    elif state.started_at is None:  # a checkpoint from before it stored this
        state.started_at = (
            (read_config(checkpoint.run_dir) or {}).get("provenance", {}).get("started_at")
        )
    say(
        f"resumed from {checkpoint.path}: epoch {state.epoch}, step {state.step} "
        f"(global step {state.global_step})"
    )
    return state


class Trainer:
    """The pieces of a run that the step loop, checkpoints and stop requests act on."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: MultiStepLR,
        engine: StepEngine,
        stats: EpochStats,
        sharding: Sharding,
        checkpointer: Checkpointer,
        stop: StopControl,
        outputs: RunOutputs,
        log_every: int,
        checkpoint_every: int,
    ) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.scheduler, self.engine, self.stats = scheduler, engine, stats
        self.sharding, self.checkpointer = sharding, checkpointer
        self.stop, self.outputs = stop, outputs
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.last_saved: Path | None = None
        self.first_step = 0  # the step this process started the epoch at
        self.segment_start = time.perf_counter()

    def train_epoch(self, state: TrainerState) -> None:
        """Train ``state.epoch`` from ``state.step`` to its end, logging every ``log_every``
        steps, checkpointing every ``checkpoint_every`` and stopping when asked."""
        self.model.train()
        self.first_step = logged = state.step
        self.segment_start = window_start = time.perf_counter()
        for _ in self.engine.run_epoch(state.epoch, state.step):
            state.step += 1
            state.global_step += 1
            self.outputs.console.advance()
            if state.global_step % self.log_every == 0:
                self.check_finite(state)
                loss_sum = self.reduced_sums(logged, state.step)[0]
                images = sum(map(self.sharding.global_batch_size_at, range(logged, state.step)))
                self.outputs.record_step(
                    {
                        "global_step": state.global_step,
                        "epoch": state.epoch,
                        "train_loss": loss_sum / images,
                        "lr": current_lr(self.optimizer),
                        "images_per_second": images / (time.perf_counter() - window_start),
                    }
                )
                logged, window_start = state.step, time.perf_counter()
            at_epoch_end = state.step == self.sharding.steps_per_epoch
            if (
                not at_epoch_end
                and self.checkpoint_every
                and (state.global_step % self.checkpoint_every == 0)
            ):
                self.save(state, mid_epoch=True)
            if self.stop.at_step_boundary():
                if self.last_saved is None or self.last_saved.name != state.name:
                    self.save(state, mid_epoch=True)
                self.stopped(state)
        self.check_finite(state)  # a host sync: the epoch's device work is done
        # The clock stops here, before the evaluation: images/s is training throughput.
        self.bank_train_seconds(state)

    def reduced_sums(self, start: int, stop: int, prior: list[float] | None = None) -> list[float]:
        """(summed loss, correct) of steps ``start`` to ``stop`` over all ranks, plus ``prior``
        (figures from before a resume, held once). A host sync and a collective."""
        sums = self.stats.sums(start, stop)
        if prior is not None and self.accelerator.is_main_process:
            sums += torch.tensor(prior, dtype=sums.dtype).to(sums.device)
        return self.accelerator.reduce(sums, reduction="sum").tolist()

    def check_finite(self, state: TrainerState) -> None:
        """Raise ``DivergedError`` on every rank if any rank saw a non-finite loss this epoch.
        A host sync and a collective: called only where the loop has one anyway."""
        if state.step == self.first_step:
            return  # no step taken yet (the same on every rank)
        local = self.stats.first_non_finite(self.first_step, state.step)
        flags = self.accelerator.gather(local).view(-1, 2)
        if flags[:, 0].any():
            step = self.first_step + int(flags[flags[:, 0] == 1, 1].min()) + 1
            global_step = state.global_step - (state.step - step)
            newest = self.last_saved or next(
                reversed(complete_checkpoints(self.checkpointer.root)), None
            )
            where = (
                f"the newest checkpoint, {newest}, holds the last good state"
                if newest
                else "no checkpoint was saved before it"
            )
            raise DivergedError(
                f"non-finite training loss at epoch {state.epoch}, step {step} (global step "
                f"{global_step}); training stopped and {where}"
            )

    def bank_train_seconds(self, state: TrainerState) -> None:
        """Add the training time since the segment started to the epoch's, and start a new
        segment."""
        now = time.perf_counter()
        state.epoch_train_seconds += now - self.segment_start
        self.segment_start = now

    def save(self, state: TrainerState, mid_epoch: bool = False) -> None:
        """Checkpoint ``state`` (``mid_epoch``: the epoch's partial figures go with it). Never
        saves a state that follows a non-finite loss."""
        if mid_epoch:
            self.check_finite(state)
            state.epoch_sums = self.reduced_sums(self.first_step, state.step, state.epoch_sums)
            self.first_step = state.step  # the figures so far now live in epoch_sums
            self.bank_train_seconds(state)
        state.scheduler = {
            "last_epoch": self.scheduler.last_epoch,
            "_last_lr": [lr_value(lr) for lr in self.scheduler.get_last_lr()],
        }
        self.last_saved = self.checkpointer.save(state)

    def end_epoch(
        self, state: TrainerState, result: EvalResult, lr: float, eval_seconds: float
    ) -> dict[str, Any]:
        """Close the epoch in ``state`` and return its record."""
        num_samples = self.sharding.num_samples
        loss_sum, correct = self.reduced_sums(self.first_step, state.step, state.epoch_sums)
        train_seconds = state.epoch_train_seconds
        record = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            "lr": lr,
            "train_loss": loss_sum / num_samples,
            "train_accuracy": correct / num_samples,
            "test_loss": result.loss,
            "test_accuracy": result.accuracy,
            "test_correct": result.correct,
            "test_total": result.total,
            "train_seconds": train_seconds,
            "epoch_seconds": train_seconds + eval_seconds,
            "images_per_second": num_samples / train_seconds,
        }
        state.history.append(record)
        state.epoch, state.step = state.epoch + 1, 0
        state.epoch_sums, state.epoch_train_seconds = [0.0, 0.0], 0.0
        return record

    def stopped(self, state: TrainerState) -> NoReturn:
        """End the run after a stop request; the checkpoint of ``state`` is on disk."""
        if self.accelerator.is_main_process:
            self.stop.stop_file.unlink(missing_ok=True)  # or the resumed run stops at once
        raise Stopped(
            f"{self.stop.describe()}: stopped at epoch "
            f"{state.epoch}, step {state.step} (global step {state.global_step}); checkpoint "
            f"{self.last_saved}; run the same command again (--resume auto) to continue"
        )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the first parameter group (a host sync under a captured step: read it only
    where the loop syncs anyway)."""
    return lr_value(optimizer.param_groups[0]["lr"])


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


def epoch_lr_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float
) -> MultiStepLR:
    """The per-epoch MultiStepLR of a prepared ``optimizer``. We step it and never prepare it:
    a prepared scheduler steps once per process (huggingface/accelerate#2926).

    torch wraps the ``step`` of the optimizer it is given, to warn when the scheduler steps
    before the optimizer; it must wrap the ``step`` that the training step calls
    (``stepped_optimizer``). With fp16's scaler that is ``AcceleratedOptimizer.step``, which
    replaces the inner optimizer's ``step`` during each call and then restores the method it
    saved in ``prepare``, from before any scheduler existed: a wrapper put on the inner
    optimizer is gone after the first step, and torch warns that
    "``optimizer.step()`` has been overridden after learning rate scheduler
    initialization".
    """
    return MultiStepLR(stepped_optimizer(optimizer), milestones=list(milestones), gamma=gamma)
