"""The epoch/step loop: train an epoch, evaluate it, save, stop when asked. The step itself is
the step engine's; the loop waits for the device only at a log step, a checkpoint, a stop, and
an epoch's end."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler

from mnist_dist.checkpoint import Checkpointer, TrainerState
from mnist_dist.console import RunConsole
from mnist_dist.data import Sharding
from mnist_dist.engine import StepEngine, StepFigures
from mnist_dist.errors import DivergedError
from mnist_dist.evaluate import EvalResult, evaluate
from mnist_dist.records import EpochRecord, StepRecord
from mnist_dist.rundir import RunDir
from mnist_dist.schedule import current_lr, schedule_state
from mnist_dist.stopping import StopControl
from mnist_dist.wandb_tracker import Tracker, namespaced


@dataclass
class Loop:
    """Everything the loop acts on, built by ``train.build``."""

    accelerator: Accelerator
    model: torch.nn.Module
    schedule: LRScheduler
    engine: StepEngine
    recorder: EpochRecorder
    test_data: Iterable[tuple[torch.Tensor, torch.Tensor]]
    checkpointer: Checkpointer
    stop: StopControl
    files: RunDir
    tracker: Tracker
    console: RunConsole
    log_every: int  # optimizer steps per step record

    def fit(self, state: TrainerState, epochs: int) -> None:
        """Train from ``state`` to the end of epoch ``epochs``; raises ``Stopped`` (checkpoint
        saved) or ``DivergedError``."""
        with self.stop.handling_signals():
            while state.epoch <= epochs:
                self.console.start_epoch(state.epoch, completed=state.step)
                lr = current_lr(self.schedule)  # the LR this epoch trains with
                self.train_epoch(state)
                eval_start = time.perf_counter()
                result = evaluate(self.model, self.test_data, self.accelerator)
                self.schedule.step()
                eval_seconds = time.perf_counter() - eval_start
                record = self.recorder.close_epoch(state, result, lr, eval_seconds)
                self.files.append_epoch(record)
                self.tracker.log(namespaced("epoch", record.to_dict()), step=record.global_step)
                self.console.end_epoch(record.to_dict())
                self.save(state)
                if state.epoch <= epochs and self.stop.now():  # not after the last epoch
                    raise self.stop.stopped(state.position, self.checkpointer.last_saved)

    def train_epoch(self, state: TrainerState) -> None:
        self.model.train()
        self.recorder.start(state)
        window = (state.step, time.perf_counter())  # the steps the next step record covers
        for _ in self.engine.run_epoch(state.epoch, state.step):
            state.step += 1
            state.global_step += 1
            self.console.advance()
            self.beat(state)
            if state.global_step % self.log_every == 0:
                self.check_finite(state)
                record = self.recorder.step_record(state, *window, current_lr(self.schedule))
                self.files.append_step(record)
                self.tracker.log(namespaced("train", record.to_dict()), step=record.global_step)
                self.console.show_step(record.train_loss, record.images_per_second)
                window = (state.step, time.perf_counter())
            if self.checkpointer.due(state, self.recorder.sharding.steps_per_epoch):
                self.save(state, mid_epoch=True)
            if self.stop.at_step_boundary():
                if not self.checkpointer.saved(state):
                    self.save(state, mid_epoch=True)
                raise self.stop.stopped(state.position, self.checkpointer.last_saved)
        self.check_finite(state)  # a host sync: the epoch's device work is done
        # The clock stops here, before the evaluation: images/s is training throughput.
        self.recorder.bank_train_seconds(state)

    def save(self, state: TrainerState, mid_epoch: bool = False) -> None:
        """Checkpoint ``state`` (``mid_epoch``: with the epoch's figures so far), never one
        that follows a non-finite loss."""
        if mid_epoch:
            self.check_finite(state)
            self.recorder.fold(state)
        state.scheduler = schedule_state(self.schedule)
        self.checkpointer.save(state)
        self.beat(state, force=True)

    def beat(self, state: TrainerState, force: bool = False) -> None:
        """The heartbeat in ``status.json``, at most every minute and after every checkpoint.
        From the loop, not a thread: a run stuck in a collective or on a hung device stops
        beating."""
        where = (state.epoch, state.step, state.global_step, self.checkpointer.last_saved)
        self.files.beat(*where, force=force)

    def check_finite(self, state: TrainerState) -> None:
        """Raise ``DivergedError`` on every rank if any rank saw a non-finite loss this epoch."""
        step = self.recorder.first_non_finite(state)
        if step is None:
            return
        global_step = state.global_step - (state.step - step)
        newest = self.checkpointer.newest()
        where = (
            f"the newest checkpoint, {newest}, holds the last good state"
            if newest
            else "no checkpoint was saved before it"
        )
        raise DivergedError(
            f"non-finite training loss at epoch {state.epoch}, step {step} (global step "
            f"{global_step}); training stopped and {where}"
        )


@dataclass
class EpochRecorder:
    """The epoch's records from the device figures since ``first_step``, the sums a mid-epoch
    checkpoint folded into the state, and the training clock. Reading the figures is a host
    sync and a collective: every rank at the same steps."""

    accelerator: Accelerator
    stats: StepFigures
    sharding: Sharding
    first_step: int = 0  # the first step whose figures are still on the device
    segment_start: float = field(default_factory=time.perf_counter)

    def start(self, state: TrainerState) -> None:
        self.first_step, self.segment_start = state.step, time.perf_counter()

    def reduced(self, start: int, stop: int, prior: list[float] | None = None) -> list[float]:
        """(summed loss, correct) of steps ``start`` to ``stop`` over all ranks, plus ``prior``
        (held once)."""
        sums = self.stats.sums(start, stop)
        if prior is not None and self.accelerator.is_main_process:
            sums += torch.tensor(prior, dtype=sums.dtype).to(sums.device)
        return self.accelerator.reduce(sums, reduction="sum").tolist()

    def first_non_finite(self, state: TrainerState) -> int | None:
        """The step (1-based, of this epoch) of the first non-finite loss on any rank, or
        None."""
        if state.step == self.first_step:
            return None  # no step taken yet (the same on every rank)
        local = self.stats.first_non_finite(self.first_step, state.step)
        flags = self.accelerator.gather(local).view(-1, 2)
        if not flags[:, 0].any():
            return None
        return self.first_step + int(flags[flags[:, 0] == 1, 1].min()) + 1

    def step_record(
        self, state: TrainerState, since_step: int, since: float, lr: float
    ) -> StepRecord:
        """The record of the steps since ``since_step`` (at perf_counter ``since``)."""
        loss_sum = self.reduced(since_step, state.step)[0]
        images = sum(map(self.sharding.global_batch_size_at, range(since_step, state.step)))
        return StepRecord(
            global_step=state.global_step,
            epoch=state.epoch,
            train_loss=loss_sum / images,
            lr=lr,
            images_per_second=images / (time.perf_counter() - since),
        )

    def fold(self, state: TrainerState) -> None:
        """Move the figures so far into ``state``, for a mid-epoch checkpoint."""
        state.epoch_sums = self.reduced(self.first_step, state.step, state.epoch_sums)
        self.first_step = state.step
        self.bank_train_seconds(state)

    def bank_train_seconds(self, state: TrainerState) -> None:
        now = time.perf_counter()
        state.epoch_train_seconds += now - self.segment_start
        self.segment_start = now

    def close_epoch(
        self, state: TrainerState, result: EvalResult, lr: float, eval_seconds: float
    ) -> EpochRecord:
        """The epoch's record, appended to ``state.history``; ``state`` moves to the next."""
        num_samples = self.sharding.num_samples
        loss_sum, correct = self.reduced(self.first_step, state.step, state.epoch_sums)
        train_seconds = state.epoch_train_seconds
        record = EpochRecord(
            epoch=state.epoch,
            global_step=state.global_step,
            lr=lr,
            train_loss=loss_sum / num_samples,
            train_accuracy=correct / num_samples,
            test_loss=result.loss,
            test_accuracy=result.accuracy,
            test_correct=result.correct,
            test_total=result.total,
            train_seconds=train_seconds,
            epoch_seconds=train_seconds + eval_seconds,
            images_per_second=num_samples / train_seconds,
        )
        state.history.append(record.to_dict())  # checkpoints hold the history as JSON
        state.epoch, state.step = state.epoch + 1, 0
        state.epoch_sums, state.epoch_train_seconds = [0.0, 0.0], 0.0
        return record
