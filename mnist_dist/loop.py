"""The epoch/step loop: train an epoch, evaluate it, save, stop when asked. The step itself is
the step engine's. Reading its device figures is a host sync and a collective: every rank does
it at the same steps, only at a log step, a checkpoint, a stop and an epoch's end."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler

from mnist_dist.checkpoint import Checkpointer, TrainerState
from mnist_dist.claim import ClaimLost
from mnist_dist.console import RunConsole
from mnist_dist.data import Sharding
from mnist_dist.distributed import lost_peer
from mnist_dist.engine import StepEngine, StepFigures
from mnist_dist.errors import DivergedError, Stopped, WriteError
from mnist_dist.evaluate import EvalResult, evaluate
from mnist_dist.records import EpochRecord, StepRecord
from mnist_dist.rundir import RunDir
from mnist_dist.schedule import current_lr, schedule_state
from mnist_dist.stopping import StopControl
from mnist_dist.wandb_tracker import Tracker, namespaced


@dataclass
class Loop:
    """A built run: everything the loop acts on, made by ``train.build``."""

    accelerator: Accelerator
    model: torch.nn.Module
    schedule: LRScheduler
    engine: StepEngine
    figures: StepFigures
    sharding: Sharding
    test_data: Iterable[tuple[torch.Tensor, torch.Tensor]]
    checkpointer: Checkpointer
    stop: StopControl
    files: RunDir
    tracker: Tracker
    console: RunConsole
    log_every: int  # optimizer steps per step record
    state: TrainerState
    resumed: bool  # from a checkpoint
    first_step: int = 0  # the first step of the epoch whose figures are still on the device
    segment_start: float = field(default_factory=time.perf_counter)  # of the training clock

    @contextmanager
    def status(self) -> Iterator[None]:
        """``status.json`` says running inside the block, then finished, stopped, diverged or
        failed (the last three with the command that continues the run); ends the tracker."""
        state, run_dir = self.state, self.files
        newest = self.checkpointer.newest()
        run_dir.beat(state.epoch, state.step, state.global_step, newest, force=True)
        try:
            yield
        except ClaimLost:
            raise  # the directory is another training's now: not a word more into it
        except (Stopped, DivergedError, WriteError) as e:
            name = {Stopped: "stopped", DivergedError: "diverged"}.get(type(e), "failed")
            e.args = (f"{e}; to continue: {run_dir.command}",)
            run_dir.write_status(name, message=str(e), exit_code=e.exit_code)
            self.tracker.finish()
            if isinstance(e, (Stopped, DivergedError)):
                # Every rank raised this at the same step: leave together, so that the first
                # launcher to exit (srun --kill-on-bad-exit ends the job's other nodes) cannot
                # cut the main process's status.json and W&B writes short.
                self.accelerator.wait_for_everyone()
            raise
        except BaseException as e:  # a second Ctrl-C, or a bug: say so to whoever watches
            # lost_peer: another rank vanished (its node died); a retry may well succeed.
            details = {"lost_peer": True} if lost_peer(e) else {}
            run_dir.write_status("failed", message=f"{type(e).__name__}: {e}", **details)
            raise
        finally:
            self.stop.close()
            self.console.close()
        run_dir.write_status("finished", epoch=state.epoch - 1, global_step=state.global_step)
        self.tracker.finish()

    def fit(self, epochs: int) -> None:
        """Train on to the end of epoch ``epochs``; raises ``Stopped`` or ``DivergedError``."""
        state = self.state
        with self.stop.handling_signals():
            while state.epoch <= epochs:
                self.console.start_epoch(state.epoch, completed=state.step)
                lr = current_lr(self.schedule)  # the LR this epoch trains with
                self.train_epoch(state)
                eval_start = time.perf_counter()
                result = evaluate(self.model, self.test_data, self.accelerator)
                self.schedule.step()
                eval_seconds = time.perf_counter() - eval_start
                record = self.close_epoch(state, result, lr, eval_seconds)
                self.files.append_epoch(record)
                self.tracker.log(namespaced("epoch", record.to_dict()), step=record.global_step)
                self.console.end_epoch(record.to_dict())
                self.save(state)
                if state.epoch <= epochs and self.stop.now():  # not after the last epoch
                    raise self.stop.stopped(state.position, self.checkpointer.last_saved)

    def train_epoch(self, state: TrainerState) -> None:
        self.model.train()
        self.first_step, self.segment_start = state.step, time.perf_counter()
        window = (state.step, time.perf_counter())  # the steps the next step record covers
        for _ in self.engine.run_epoch(state.epoch, state.step):
            state.step += 1
            state.global_step += 1
            self.console.advance()
            self.beat(state)
            if state.global_step % self.log_every == 0:
                self.check_finite(state)
                record = self.step_record(state, *window)
                self.files.append_step(record)
                self.tracker.log(namespaced("train", record.to_dict()), step=record.global_step)
                self.console.show_step(record.train_loss, record.images_per_second)
                window = (state.step, time.perf_counter())
            if self.checkpointer.due(state, self.sharding.steps_per_epoch):
                self.save(state, mid_epoch=True)
            if self.stop.at_step_boundary():
                if not self.checkpointer.saved(state):
                    self.save(state, mid_epoch=True)
                raise self.stop.stopped(state.position, self.checkpointer.last_saved)
        self.check_finite(state)  # a host sync: the epoch's device work is done
        # The clock stops here, before the evaluation: images/s is training throughput.
        self.bank_train_seconds(state)

    def save(self, state: TrainerState, mid_epoch: bool = False) -> None:
        """Checkpoint ``state`` (``mid_epoch``: with the epoch's figures so far) unless diverged."""
        if mid_epoch:
            self.check_finite(state)
            state.epoch_sums = self.reduced(self.first_step, state.step, state.epoch_sums)
            self.first_step = state.step
            self.bank_train_seconds(state)
        state.scheduler = schedule_state(self.schedule)
        self.checkpointer.save(state)
        self.beat(state, force=True)

    def beat(self, state: TrainerState, force: bool = False) -> None:
        """The heartbeat in ``status.json``, at most every minute and after every checkpoint;
        from the loop, not a thread, so that a stuck run stops beating."""
        where = (state.epoch, state.step, state.global_step, self.checkpointer.last_saved)
        self.files.beat(*where, force=force)

    def check_finite(self, state: TrainerState) -> None:
        """Raise ``DivergedError`` on every rank if any rank saw a non-finite loss this epoch."""
        if state.step == self.first_step:
            return  # no step taken yet (the same on every rank)
        local = self.figures.first_non_finite(self.first_step, state.step)
        flags = self.accelerator.gather(local).view(-1, 2)
        if not flags[:, 0].any():
            return
        step = self.first_step + int(flags[flags[:, 0] == 1, 1].min()) + 1  # of this epoch
        global_step = state.global_step - (state.step - step)
        newest = self.checkpointer.newest()
        where = f"the newest checkpoint, {newest}, holds the last good state"
        raise DivergedError(
            f"non-finite training loss at epoch {state.epoch}, step {step} (global step "
            f"{global_step}); training stopped and "
            + (where if newest else "no checkpoint was saved before it")
        )

    def reduced(self, start: int, stop: int, prior: list[float] | None = None) -> list[float]:
        """(summed loss, correct) of steps ``start`` to ``stop`` over all ranks, plus ``prior``."""
        sums = self.figures.sums(start, stop)
        if prior is not None and self.accelerator.is_main_process:
            sums += torch.tensor(prior, dtype=sums.dtype).to(sums.device)
        return self.accelerator.reduce(sums, reduction="sum").tolist()

    def step_record(self, state: TrainerState, since_step: int, since: float) -> StepRecord:
        """The record of the steps since ``since_step`` (at perf_counter ``since``)."""
        loss_sum = self.reduced(since_step, state.step)[0]
        images = sum(map(self.sharding.global_batch_size_at, range(since_step, state.step)))
        return StepRecord(
            global_step=state.global_step,
            epoch=state.epoch,
            train_loss=loss_sum / images,
            lr=current_lr(self.schedule),
            images_per_second=images / (time.perf_counter() - since),
        )

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
