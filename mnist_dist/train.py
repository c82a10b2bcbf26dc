"""Build everything from a ``Config``, run the epoch loop, write the run directory."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
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
from mnist_dist.data import TrainData, build_train_data, ensure_raw_files, eval_batches
from mnist_dist.distributed import describe_processes, make_accelerator, provenance
from mnist_dist.errors import DivergedError, Stopped, UsageError, WriteError
from mnist_dist.evaluate import EvalResult, evaluate
from mnist_dist.model import MnistCNN
from mnist_dist.rundir import RunDir, read_config, resolve_run_dir
from mnist_dist.stopping import STOP_FILE, StopControl
from mnist_dist.tracking import MAX_TABLE_ROWS, RunConsole, RunOutputs, make_tracker, wants_wandb


def train(config: Config) -> dict[str, Any]:
    """Train as ``config`` says and return the summary (also written to ``summary.json``).

    Raises ``Stopped`` after a stop request (checkpoint saved, resumable), ``DivergedError`` on
    a non-finite loss, ``WriteError`` when run state cannot be written, ``UsageError`` for bad
    input.
    """
    started = time.perf_counter()
    log_with = "wandb" if wants_wandb(config.tracking) else None
    accelerator = make_accelerator(
        config.train.mixed_precision, log_with=log_with, static_graph=config.train.grad_accum == 1
    )
    try:
        return _train(accelerator, config, started)
    finally:
        accelerator.end_training()  # destroys the process group on every rank


def _train(accelerator: Accelerator, config: Config, started: float) -> dict[str, Any]:
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

    launch = provenance(accelerator)
    if checkpoint is not None:
        launch["resumed_at"] = launch["started_at"]
    # The first start's time describes the run; a branch is a run of its own.
    launch["started_at"] = state.started_at = state.started_at or launch["started_at"]
    launch["resumed_from"] = str(checkpoint.path) if checkpoint else None
    launch["branched_from"] = state.branched_from
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

    trainer = Trainer(
        accelerator, model, optimizer, scheduler, train_data, checkpointer,
        StopControl(accelerator, run_dir.path / STOP_FILE), outputs, tc.grad_accum,
        tc.log_every, cc.checkpoint_every,
    )  # fmt: skip
    run_dir.write_status("running", epoch=state.epoch, step=state.step)
    try:
        with trainer.stop.handling_signals():
            while state.epoch <= tc.epochs:
                console.start_epoch(state.epoch, completed=state.step)
                lr = optimizer.param_groups[0]["lr"]
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
        data: TrainData,
        checkpointer: Checkpointer,
        stop: StopControl,
        outputs: RunOutputs,
        grad_accum: int,
        log_every: int,
        checkpoint_every: int,
    ) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.scheduler, self.data, self.checkpointer = scheduler, data, checkpointer
        self.stop, self.outputs = stop, outputs
        self.grad_accum, self.log_every = grad_accum, log_every
        self.checkpoint_every = checkpoint_every
        self.last_saved: Path | None = None
        device = accelerator.device
        # Per epoch, on the device (no per-step host sync): this rank's summed loss and correct
        # predictions, and how many leading steps had a finite loss (the NaN guard).
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)
        self.finite_steps = torch.zeros((), device=device, dtype=torch.int64)
        self.all_finite = torch.ones((), device=device, dtype=torch.bool)
        self.segment_start = time.perf_counter()

    def train_epoch(self, state: TrainerState) -> None:
        """Train ``state.epoch`` from ``state.step`` to its end, logging every ``log_every``
        steps, checkpointing every ``checkpoint_every`` and stopping when asked."""
        self.model.train()
        sharding = self.data.sharding
        self.sums.zero_()
        if self.accelerator.is_main_process:  # the epoch's figures before a resume, once
            self.sums += torch.tensor(state.epoch_sums, dtype=torch.float64).to(self.sums.device)
        self.finite_steps.zero_()
        self.all_finite.fill_(True)
        self.segment_start = time.perf_counter()
        first_step = state.step
        logged, window_images, window_start = self.sums.clone(), 0, time.perf_counter()
        for images, labels in self.data.epoch(state.epoch, start_step=first_step):
            batch = sharding.global_batch_size_at(state.step)
            step_sums = train_step(
                self.model, self.optimizer, self.accelerator, images, labels, batch,
                self.grad_accum,
            )  # fmt: skip
            self.all_finite &= torch.isfinite(step_sums[0])
            self.finite_steps += self.all_finite
            self.sums += step_sums
            window_images += batch
            state.step += 1
            state.global_step += 1
            self.outputs.console.advance()
            if state.global_step % self.log_every == 0:
                self.check_finite(state, first_step)
                window = self.accelerator.reduce(self.sums - logged, reduction="sum")
                self.outputs.record_step(
                    {
                        "global_step": state.global_step,
                        "epoch": state.epoch,
                        "train_loss": window[0].item() / window_images,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_second": window_images / (time.perf_counter() - window_start),
                    }
                )
                logged, window_images, window_start = self.sums.clone(), 0, time.perf_counter()
            at_epoch_end = state.step == sharding.steps_per_epoch
            if (
                not at_epoch_end
                and self.checkpoint_every
                and (state.global_step % self.checkpoint_every == 0)
            ):
                self.save(state, first_step)
            if self.stop.at_step_boundary():
                if self.last_saved is None or self.last_saved.name != state.name:
                    self.save(state, first_step)
                self.stopped(state)
        self.check_finite(state, first_step)  # a host sync: the epoch's device work is done
        # The clock stops here, before the evaluation: images/s is training throughput.
        self.bank_train_seconds(state)

    def check_finite(self, state: TrainerState, first_step: int) -> None:
        """Raise ``DivergedError`` on every rank if any rank saw a non-finite loss this epoch.
        A host sync and a collective: called only where the loop has one anyway."""
        flags = self.accelerator.gather(torch.stack([~self.all_finite, self.finite_steps]).long())
        bad = flags.view(-1, 2)
        if bad[:, 0].any():
            step = first_step + int(bad[bad[:, 0] == 1, 1].min()) + 1
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

    def save(self, state: TrainerState, first_step: int | None = None) -> None:
        """Checkpoint ``state`` (mid-epoch when ``first_step`` is given: the epoch's partial
        figures go with it). Never saves a state that follows a non-finite loss."""
        if first_step is not None:
            self.check_finite(state, first_step)
            state.epoch_sums = self.accelerator.reduce(self.sums, reduction="sum").tolist()
            self.bank_train_seconds(state)
        state.scheduler = {
            "last_epoch": self.scheduler.last_epoch,
            "_last_lr": self.scheduler.get_last_lr(),
        }
        self.last_saved = self.checkpointer.save(state)

    def end_epoch(
        self, state: TrainerState, result: EvalResult, lr: float, eval_seconds: float
    ) -> dict[str, Any]:
        """Close the epoch in ``state`` and return its record."""
        sharding = self.data.sharding
        loss_sum, correct = self.accelerator.reduce(self.sums, reduction="sum").tolist()
        train_seconds = state.epoch_train_seconds
        record = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            "lr": lr,
            "train_loss": loss_sum / sharding.num_samples,
            "train_accuracy": correct / sharding.num_samples,
            "test_loss": result.loss,
            "test_accuracy": result.accuracy,
            "test_correct": result.correct,
            "test_total": result.total,
            "train_seconds": train_seconds,
            "epoch_seconds": train_seconds + eval_seconds,
            "images_per_second": sharding.num_samples / train_seconds,
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
    (summed loss, correct predictions) on the device, in float32.
    """
    scale = accelerator.num_processes / global_batch_size
    if grad_accum == 1:  # the common case, without the split and the stack
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        backward(accelerator, loss * scale)
        correct = (logits.argmax(dim=1) == labels).sum()
        optimizer_step(optimizer)
        return torch.stack([loss.detach(), correct.to(loss.dtype)])
    stats = []
    micro_batches = list(
        zip(images.tensor_split(grad_accum), labels.tensor_split(grad_accum), strict=True)
    )
    for i, (x, y) in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch.
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            backward(accelerator, loss * scale)
        # Few, small device ops and no host sync: on a GPU every op is a kernel launch.
        correct = (logits.argmax(dim=1) == y).sum()
        stats.append(torch.stack([loss.detach(), correct.to(loss.dtype)]))
    optimizer_step(optimizer)
    return torch.stack(stats).sum(dim=0)


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """``accelerator.backward(loss)`` without its division of the loss by the accumulation
    steps, which the loss scale already covers: with ``gradient_accumulation_steps`` left at 1
    it adds a division, forward and backward, to every step. Only fp16's grad scaler needs
    Accelerate's path (issue 6)."""
    if getattr(accelerator, "scaler", None) is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` then ``zero_grad``, bypassing ``AcceleratedOptimizer.step`` when it
    would only forward the call: without a grad scaler (fp16) it adds nothing here but an
    uncached package look-up (``is_lomo_available``, twice, about 30 us each) per step (issue 6)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(optimizer, "scaler", None) is None:
        inner.step()
    else:
        optimizer.step()  # the scaler unscales, skips steps with inf gradients, updates
    inner.zero_grad(set_to_none=True)


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
    before the optimizer; it must wrap the ``step`` that ``optimizer_step`` calls. Without a
    grad scaler that is the inner optimizer's. With fp16's scaler it is
    ``AcceleratedOptimizer.step``, which replaces the inner optimizer's ``step`` during each
    call and then restores the method it saved in ``prepare``, from before any scheduler
    existed: a wrapper put on the inner optimizer is gone after the first step, and torch
    warns that "``optimizer.step()`` has been overridden after learning rate scheduler
    initialization".
    """
    scaled = getattr(optimizer, "scaler", None) is not None
    stepped = optimizer if scaled else getattr(optimizer, "optimizer", optimizer)
    return MultiStepLR(stepped, milestones=list(milestones), gamma=gamma)
