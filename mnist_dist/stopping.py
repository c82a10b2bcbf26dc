"""Stopping a run at a step boundary: signals, a stop file, and every rank agreeing on when."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from accelerate import Accelerator

from mnist_dist.errors import Stopped


class StopControl:
    """Turns this rank's stop requests (signals, the stop file) into one decision for all ranks
    at the same step boundary: the answer at boundary ``k`` is an all-reduce started at ``k - 1``.
    ``accelerate launch`` forwards SIGTERM and SIGINT, but SIGUSR1 kills the launcher itself."""

    def __init__(
        self, accelerator: Accelerator, stop_file: Path, poll_seconds: float = 0.5
    ) -> None:
        self.stop_file, self.poll_seconds = stop_file, poll_seconds
        self._is_main = accelerator.is_main_process
        self.reason: str | None = None  # why this rank wants to stop
        self._next_poll = 0.0
        # A CPU group of its own, also when training runs on NCCL: a CPU flag needs no device
        # sync, and these tiny all-reduces never queue behind gradient buckets.
        self._group = dist.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    @contextmanager
    def handling_signals(self) -> Iterator[StopControl]:
        stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in stop_signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.reason = self.reason or f"signal {signal.Signals(signum).name}"

    def _requested_here(self, force_poll: bool = False) -> bool:
        now = time.monotonic()
        if self.reason is None and (force_poll or now >= self._next_poll):
            # Throttled: on a cluster file system a stat per step per rank adds up.
            self._next_poll = now + self.poll_seconds
            if self.stop_file.exists():
                self.reason = f"stop file {self.stop_file}"
        return self.reason is not None

    def at_step_boundary(self) -> bool:
        """Whether every rank stops now; call at every step boundary on every rank."""
        local = self._requested_here()
        if self._group is None:
            return local
        stop = self.close()
        if not stop:
            flag = torch.tensor([int(local)], dtype=torch.int32)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            self._pending = (work, flag)
        return stop

    def now(self) -> bool:
        """Whether every rank stops now, agreed synchronously (at the end of an epoch)."""
        local = self._requested_here(force_poll=True)
        if self._group is None:
            return local
        earlier = self.close()
        flag = torch.tensor([int(local or earlier)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def stopped(self, position: str, checkpoint: Path | None) -> Stopped:
        """The error that ends the run; removes the stop file, or a resume would stop at once."""
        if self._is_main:
            self.stop_file.unlink(missing_ok=True)
        return Stopped(f"{self.describe()}: stopped at {position}; checkpoint {checkpoint}")

    def describe(self) -> str:
        self._requested_here(force_poll=True)
        return self.reason or "another rank asked to stop"

    def close(self) -> bool:
        """Wait for the agreement in flight, if any, and return its result."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        pending[0].wait()
        return bool(pending[1].item())
