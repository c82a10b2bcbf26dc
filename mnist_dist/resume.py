"""The resume policy: what ``--resume`` finds, what a training is refused, the restore, and the
command that continues a run."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.optim.lr_scheduler import LRScheduler

from mnist_dist.checkpoint import Checkpoint, TrainerState, complete_checkpoints, read_checkpoint
from mnist_dist.config import Config, changed_math_settings
from mnist_dist.distributed import say
from mnist_dist.errors import UsageError, first_line
from mnist_dist.layout import STATE_FILE, parse_resume, run_dir_of
from mnist_dist.records import Summary
from mnist_dist.rundir import RunDir
from mnist_dist.schedule import restore_schedule


@dataclass(frozen=True)
class Resumption:
    """What a training in a run directory starts from."""

    checkpoint: Checkpoint | None  # None: a new run
    branch: bool  # the checkpoint belongs to another run directory: a run of its own
    finished: Summary | None  # the finished run the directory holds, if nothing is left to do

    def restore(
        self, accelerator: Accelerator, fresh: TrainerState, schedule: LRScheduler
    ) -> TrainerState:
        """Load the checkpoint into the prepared model, optimizer and ``schedule``; return its
        state with this run's settings (``fresh``), and for a branch this run's start."""
        path, state = self.checkpoint.path, self.checkpoint.state
        # A mid-epoch checkpoint continues the epoch's permutation, fixed by the seed, global
        # batch and training set; one at an epoch boundary continues with any world size.
        for name, flag in (
            ("seed", "--seed"),
            ("global_batch_size", "--batch-size"),
            ("num_samples", "--max-train-samples"),
        ):
            if state.step and getattr(state, name) != getattr(fresh, name):
                raise UsageError(
                    f"checkpoint {path} was taken mid-epoch with {name} {getattr(state, name)}, "
                    f"this run has {getattr(fresh, name)}: resume with the same {flag}, or from "
                    "a checkpoint at an epoch boundary"
                )
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # torch and safetensors raise many types for damaged files
            raise UsageError(f"cannot load checkpoint {path}: {first_line(e)}") from None
        restore_schedule(schedule, state.scheduler, self.branch)
        # Ranks the checkpoint has no RNG states for keep fresh ones, which load_state only
        # logs at INFO (huggingface/accelerate#4283): the note below covers it.
        if state.world_size != fresh.world_size:
            say(
                f"note: {path.name} was saved by {state.world_size} process(es), "
                f"resuming on {fresh.world_size}: results stay within noise, not bit for bit"
            )
        state.seed, state.global_batch_size = fresh.seed, fresh.global_batch_size
        state.num_samples, state.world_size = fresh.num_samples, fresh.world_size
        state.config = fresh.config
        if self.branch:
            state.started_at, state.run_wall_seconds = fresh.started_at, fresh.run_wall_seconds
            state.branched_from = str(path)
        say(f"resumed from {path}: {state.position}")
        return state


def decide(
    run_dir: RunDir,
    config: Config,
    accelerator: Accelerator | None = None,
    tell: Callable[[str], None] = say,
) -> Resumption:
    """What training with ``config`` does in ``run_dir``, the same on every rank of
    ``accelerator``; raises ``UsageError`` for what it refuses. Notes go to ``tell``."""
    path, resume, epochs = run_dir.path, config.checkpoint.resume, config.train.epochs
    root = run_dir.layout.checkpoints
    checkpoint = _located(root, resume, accelerator, tell)
    branch = checkpoint is not None and checkpoint.path.resolve().parent != root.resolve()
    if (checkpoint is None or branch) and run_dir.layout.metrics.exists():
        if resume == "never":  # it looked at no checkpoint: whether any is intact is unknown
            raise UsageError(
                f"{path} already holds a run; --resume never starts a new one, which "
                "needs a directory of its own: choose another --output-dir (or --resume auto "
                "to continue this run)"
            )
        raise UsageError(
            f"{path} already holds a run and no intact checkpoint to resume "
            f"(--resume {resume}); choose another --output-dir"
        )
    if checkpoint is not None and checkpoint.state.config is not None:
        changed = changed_math_settings(checkpoint.state.config, config.to_dict())
        was, now = " ".join(old for old, _ in changed), " ".join(new for _, new in changed)
        if changed and branch:
            tell(f"note: branching from {checkpoint.path}, trained with {was}; this run has {now}")
        elif changed:
            raise UsageError(
                f"{path} was trained with {was}; this command has {now}: resume with the "
                "run's settings or choose another --output-dir"
            )
    finished = None if branch else run_dir.finished_summary()
    if finished is not None:
        done = finished.epochs_completed
        if epochs <= done:
            tell(
                f"mnist-dist: {path} holds a finished run: {done} epoch(s), test accuracy "
                f"{finished.test_accuracy:.2%}; summary in {run_dir.layout.summary}; pass "
                f"--epochs above {done} to train it further"
            )
            return Resumption(checkpoint, branch, finished)
        tell(f"note: {path} finished {done} epoch(s); training on to {epochs}")
    if checkpoint is not None:
        state = checkpoint.state
        trained = state.epoch - 1 if state.step == 0 else state.epoch  # whole or partial epochs
        if epochs < trained:
            raise UsageError(
                f"checkpoint {checkpoint.path} has trained past --epochs {epochs} (it resumes at "
                f"epoch {state.epoch}, step {state.step}): pass --epochs {trained} or more"
            )
    return Resumption(checkpoint, branch, None)


def _located(
    root: Path, resume: str, accelerator: Accelerator | None, tell: Callable[[str], None]
) -> Checkpoint | None:
    """``locate``'s checkpoint (or its ``UsageError``), found on the main process, on every rank."""
    found: list[Any] = [None, None]  # path, error
    if accelerator is None or accelerator.is_main_process:
        try:
            found[0] = locate(root, resume, tell)
        except UsageError as e:
            found[1] = str(e)
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[1] is not None:
        raise UsageError(found[1])
    if (path := found[0]) is None:
        return None
    return Checkpoint(path, TrainerState.from_json((path / STATE_FILE).read_text()))


def locate(root: Path, resume: str, tell: Callable[[str], None]) -> Path | None:
    """The checkpoint ``--resume`` names for the checkpoints folder ``root``: ``auto``, the
    newest intact one, or None; ``never``, None; a path, that one, or an error; a path into a
    run directory that already holds the branch started from it, the branch's newest."""
    choice = parse_resume(resume)
    if choice.never:
        return None
    if choice.path is not None:
        path = choice.path
        read_checkpoint(path)  # raises with the reason
        if path.resolve().parent == root.resolve():
            newest = next(reversed(complete_checkpoints(root)), path)
            if newest.name != path.name:
                raise UsageError(
                    f"{root} holds checkpoints newer than {path.name} "
                    f"({newest.name}); resume into another --output-dir"
                )
            return path
        own = locate(root, "auto", tell)
        if own is None:
            return path  # a new branch
        branched_from = TrainerState.from_json((own / STATE_FILE).read_text()).branched_from
        if branched_from and Path(branched_from).resolve() == path.resolve():
            return own  # the branch's own newest: the same command continues it
        raise UsageError(
            f"{root.parent} already holds a run; continue it with --resume auto, "
            f"or branch from {path} into a new --output-dir"
        )
    for path in reversed(complete_checkpoints(root)):
        try:
            read_checkpoint(path)
            return path
        except UsageError as e:
            tell(f"warning: {e}; trying the previous checkpoint")
    return None


def continue_command(run_dir: Path, resume: str) -> str:
    """The command that continues this run, shell-quoted: the one the user ran (the launcher's
    under ``accelerate launch``; a resubmission of ``slurm/train.sbatch`` in its jobs) with
    ``--output-dir run_dir`` (in the form the user gave), and ``--resume auto`` in place of a
    ``resume`` that would not continue it: ``never``, or one of the run's own checkpoints."""
    prefix, args = _invocation()
    args = _with_option(args, "--output-dir", str(run_dir))
    choice = parse_resume(resume)
    own = choice.path is not None and run_dir_of(choice.path).resolve() == run_dir.resolve()
    if choice.never or own:
        args = _with_option(args, "--resume", "auto")
    return shlex.join([*prefix, *args])


def _invocation() -> tuple[list[str], list[str]]:
    """(the words that started mnist-dist, as typed; the sub-command and its arguments)."""
    args = sys.argv[1:]
    # slurm/train.sbatch exports the plan doctor wrote (MNIST_DIST_RUN_DIR among it) to the
    # ranks: a job of that script continues by a resubmission, not by a node's own command.
    in_sbatch_job = os.environ.get("SLURM_JOB_ID") and os.environ.get("MNIST_DIST_RUN_DIR")
    if in_sbatch_job and args[:1] == ["train"]:
        return ["sbatch", "slurm/train.sbatch"], args[1:]
    # A rank of accelerate launch / torchrun: its launcher's argv first, then its own (Linux).
    pids = [os.getppid(), os.getpid()] if "LOCAL_RANK" in os.environ else [os.getpid()]
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if args and argv.split("\0")[-len(args) - 1 : -1] == args:
            return _as_typed(argv.split("\0")[: -len(args) - 1]), args
    if Path(sys.argv[0]).name == "__main__.py":
        return [sys.executable, "-m", "mnist_dist"], args
    return _as_typed([sys.executable, sys.argv[0]]), args


def _as_typed(prefix: list[str]) -> list[str]:
    """A script started through its ``#!`` line shows as ``python /path/to/script``: the
    script's name alone when it is the one on PATH (``mnist-dist``, ``accelerate``)."""
    if len(prefix) >= 2 and Path(prefix[0]).name.startswith("python"):
        script = prefix[1]
        if not script.startswith("-") and Path(script).is_file():
            found = shutil.which(Path(script).name)
            same = found is not None and Path(found).resolve() == Path(script).resolve()
            return [Path(script).name if same else script, *prefix[2:]]
    return prefix


def _with_option(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag value`` in place of every ``flag X`` / ``flag=X``, or at the end."""
    out, words, given = [], iter(args), False
    for word in words:
        if word == flag or word.startswith(flag + "="):
            if word == flag:
                next(words, None)  # its value
            out += [] if given else [flag, value]
            given = True
        else:
            out.append(word)
    return out if given else [*out, flag, value]
