"""The launch plan of a job (nodes, processes, rendezvous) from SLURM and environment variables."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mnist_dist.errors import UsageError, first_line

PROCS_PER_NODE_ENV = "MNIST_DIST_PROCS_PER_NODE"
MAIN_ADDR_ENV = "MNIST_DIST_MAIN_ADDR"
MAIN_PORT_ENV = "MNIST_DIST_MAIN_PORT"
COLLECTIVE_TIMEOUT_ENV = "MNIST_DIST_COLLECTIVE_TIMEOUT"
DEFAULT_PORT = 29500
# Lightning's rule: two jobs that share a node get different ports.
SLURM_PORT_BASE = 15000


@dataclass
class LaunchPlan:
    """What one job launches: ``nodes`` x ``procs_per_node`` processes meeting at
    ``main_addr:main_port``, writing to ``run_dir``; ``doctor``'s checks fill it in."""

    nodes: int = 1
    node_rank: int = 0
    procs_per_node: int = 1
    main_addr: str = "127.0.0.1"
    main_port: int = DEFAULT_PORT
    run_dir: Path = Path("runs")
    wandb_mode: str | None = None  # None: tracking off

    @property
    def num_processes(self) -> int:
        return self.nodes * self.procs_per_node


def _positive_int(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def procs_per_node(gpus: int) -> int:
    """``MNIST_DIST_PROCS_PER_NODE``, else one process per GPU, else one."""
    override = os.environ.get(PROCS_PER_NODE_ENV)
    return _positive_int(PROCS_PER_NODE_ENV, override) if override else max(gpus, 1)


def main_port() -> int:
    """``MNIST_DIST_MAIN_PORT``, else one derived from the SLURM job id, else ``DEFAULT_PORT``."""
    if port := os.environ.get(MAIN_PORT_ENV):
        if _positive_int(MAIN_PORT_ENV, port) > 65535:
            raise UsageError(f"{MAIN_PORT_ENV} must be a port (1-65535), got {port}")
        return int(port)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    return SLURM_PORT_BASE + int(job_id) % 10000 if job_id.isdigit() else DEFAULT_PORT


def main_addr() -> str:
    """``MNIST_DIST_MAIN_ADDR``, else the first host of the SLURM job, else this machine."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    return os.environ.get(MAIN_ADDR_ENV) or (first_host(nodelist) if nodelist else "127.0.0.1")


def collective_timeout() -> timedelta | None:
    """``MNIST_DIST_COLLECTIVE_TIMEOUT`` (seconds): how long a rank waits in a collective (and at
    the rendezvous) for the others before it fails. A rank whose peer vanished without closing
    its connections (a node that died, a cut network) waits this long; a peer that exits
    closes them and is noticed at once. None: PyTorch's default (30 minutes for gloo)."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?", value) or float(value) <= 0:
        raise UsageError(f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return timedelta(seconds=float(value))


def visible_gpus() -> int:
    """GPUs this node can use: the scheduler's figure (``SLURM_GPUS_ON_NODE``, else
    ``SLURM_GPUS_PER_NODE``: ``2`` or ``a100:2``), else what CUDA sees."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = os.environ.get(name, "").rsplit(":", 1)[-1]
        if count.isdigit():
            return int(count)
    import torch

    return torch.cuda.device_count()


def node_cpus() -> int:
    """CPUs this job may use on this node."""
    for name in ("SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-05,07]`` -> ``node03``), expanded by
    ``scontrol`` itself."""
    try:
        command = ["scontrol", "show", "hostnames", nodelist]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
        hosts = out.stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UsageError(
            f"cannot expand SLURM_JOB_NODELIST {nodelist!r}: {first_line(e)}"
        ) from None
    if not hosts:
        raise UsageError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return hosts[0]


def port_is_free(port: int) -> bool:
    """Whether the rendezvous could listen on ``port`` here (as torch's TCPStore would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def write_env(plan: LaunchPlan, path: str | os.PathLike[str]) -> None:
    """The plan as ``export NAME=value`` lines for ``slurm/launch-node.sh`` to source."""
    env = {
        "MNIST_DIST_RUN_DIR": str(plan.run_dir),
        PROCS_PER_NODE_ENV: str(plan.procs_per_node),
        "MNIST_DIST_NUM_PROCESSES": str(plan.num_processes),
        MAIN_ADDR_ENV: plan.main_addr,
        MAIN_PORT_ENV: str(plan.main_port),
    }
    if plan.wandb_mode:
        env["WANDB_MODE"] = plan.wandb_mode
    try:
        Path(path).write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def continue_command(run_dir: Path, resume_auto: bool) -> str:
    """The command that continues this run, shell-quoted: the one the user ran (the launcher's
    under ``accelerate launch``; the resubmission of ``slurm/train.sbatch`` in its jobs) with
    ``--output-dir run_dir`` in place of any given, and ``--resume auto`` where asked. The run
    directory keeps the form the user gave (relative or not), like ``--data-dir ./data``."""
    prefix, args = _invocation()
    args = _with_option(args, "--output-dir", str(run_dir))
    if resume_auto:
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
    pids = [os.getpid()]
    if os.environ.get("LOCAL_RANK") is not None:  # a rank of accelerate launch / torchrun
        pids.insert(0, os.getppid())
    for pid in pids:  # the process's argv as it was started (Linux)
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
    out, given, i = [], False, 0
    while i < len(args):
        word = args[i]
        if word == flag or word.startswith(flag + "="):
            if not given:
                out += [flag, value]
            given = True
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    return out if given else [*out, flag, value]
