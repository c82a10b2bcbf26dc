"""``mnist-dist doctor``: the pre-flight checks of a launch, which fill in its launch plan.
A wrong multi-node job seldom fails: it hangs at the rendezvous or trains on the wrong number
of processes. The checks take seconds, before any process group exists; ``slurm/train.sbatch``
runs them on every job and launches from the plan they write."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mnist_dist import claim
from mnist_dist.config import Config
from mnist_dist.distributed import check_precision, collective_timeout
from mnist_dist.errors import UsageError, first_line
from mnist_dist.layout import RUNS_DIR, RunLayout

PROCS_PER_NODE_ENV = "MNIST_DIST_PROCS_PER_NODE"
MAIN_PORT_ENV = "MNIST_DIST_MAIN_PORT"


@dataclass
class LaunchPlan:
    """What one job launches: ``nodes`` x ``procs_per_node`` processes meeting at
    ``main_addr:main_port``, writing to ``layout``; each of its checks fills in its part."""

    config: Config
    gpus: int  # on this node
    nodes: int
    node_rank: int
    procs_per_node: int = 1
    main_addr: str = "127.0.0.1"
    main_port: int = 29500
    layout: RunLayout = field(default_factory=lambda: RunLayout(Path(RUNS_DIR)))
    wandb_mode: str | None = None  # None: tracking off

    @property
    def num_processes(self) -> int:
        return self.nodes * self.procs_per_node

    def write_env(self, path: str) -> None:
        """The plan as ``export NAME=value`` lines for ``slurm/launch-node.sh`` to source."""
        env = {
            "MNIST_DIST_RUN_DIR": str(self.layout.root),
            PROCS_PER_NODE_ENV: str(self.procs_per_node),
            "MNIST_DIST_NUM_PROCESSES": str(self.num_processes),
            "MNIST_DIST_MAIN_ADDR": self.main_addr,
            MAIN_PORT_ENV: str(self.main_port),
            "WANDB_MODE": self.wandb_mode,
        }
        lines = [f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if v is not None]
        try:
            Path(path).write_text("".join(lines))
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None

    def _tasks(self) -> str:
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
        tasks = os.environ.get("SLURM_NTASKS")
        if (per_node and per_node != "1") or (tasks and int(tasks) != self.nodes):
            got = f"--ntasks-per-node={per_node}" if per_node else f"--ntasks={tasks}"
            raise UsageError(
                f"one `accelerate launch` per node needs --ntasks-per-node=1, got {got} on "
                f"{self.nodes} node(s): accelerate starts each node's processes itself"
            )
        return f"1 per node on {self.nodes} node(s)"

    def _processes(self) -> str:
        per_node = self.procs_per_node = _env_int(PROCS_PER_NODE_ENV, max(self.gpus, 1))
        shape = f"{per_node} per node x {self.nodes} node(s) = world size {self.num_processes}"
        if self.gpus:
            if per_node > self.gpus:
                raise UsageError(
                    f"{PROCS_PER_NODE_ENV}={per_node} but this node has {self.gpus} GPU(s); "
                    "ask for more with --gpus-per-node or start fewer processes"
                )
            return f"{shape}, one per GPU ({self.gpus} on this node)"
        cpus = _node_cpus()
        if per_node > cpus:
            raise UsageError(
                f"{PROCS_PER_NODE_ENV}={per_node} CPU processes but this node has {cpus} CPU(s) "
                "for the job; ask for more with --cpus-per-task or start fewer processes"
            )
        return f"{shape}, on CPU (no GPU on this node; {cpus} CPU(s))"

    def _precision(self) -> str:
        return check_precision(self.config.train.mixed_precision, self.gpus)

    def _batch(self) -> str:
        per_device = self.config.train.per_device_batch_size(self.num_processes)
        return f"{self.config.train.global_batch_size} per step = {per_device} per process"

    def _rendezvous(self) -> str:
        if (job_id := os.environ.get("SLURM_JOB_ID", "")).isdigit():
            self.main_port = 15000 + int(job_id) % 10000  # two jobs on one node: two ports
        self.main_port = _env_int(MAIN_PORT_ENV, self.main_port)
        if self.main_port > 65535:
            raise UsageError(f"{MAIN_PORT_ENV} must be a port (1-65535), got {self.main_port}")
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        self.main_addr = os.environ.get("MNIST_DIST_MAIN_ADDR") or (
            _first_host(nodelist) if nodelist else "127.0.0.1"
        )
        try:
            socket.getaddrinfo(self.main_addr, self.main_port)
        except OSError as e:
            raise UsageError(f"main address {self.main_addr} does not resolve: {e}") from None
        where = f"{self.main_addr}:{self.main_port}"
        if (timeout := collective_timeout()) is not None:  # a bad value fails here, before launch
            where += f" (collectives time out after {timeout.total_seconds():g}s)"
        if self.node_rank != 0:
            return f"{where}, checked on node 0"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore
            try:
                s.bind(("", self.main_port))
            except OSError:
                raise UsageError(
                    f"port {self.main_port} is in use on this node; set {MAIN_PORT_ENV} to a "
                    "free port"
                ) from None
        return f"{where}, port free"

    def _data(self) -> str:
        from mnist_dist.data import misplaced_mnist, raw_dir, verify_raw_files

        data = self.config.data
        folder = raw_dir(data.data_dir)
        if not Path(data.data_dir).is_dir():
            if data.download:
                return f"{data.data_dir} missing: --download will fetch MNIST (needs internet)"
            raise UsageError(f"data directory {data.data_dir} does not exist or is not a folder")
        if not os.access(data.data_dir, os.R_OK | os.X_OK):
            raise UsageError(f"data directory {data.data_dir} is not readable")
        try:
            verify_raw_files(data.data_dir)
        except (UsageError, OSError) as e:
            if data.download and not misplaced_mnist(data.data_dir):
                return f"{first_line(e)}; --download will fetch MNIST (needs internet)"
            raise UsageError(f"{first_line(e)} (in {folder})") from None
        return f"{folder}: MNIST verified"

    def _output(self) -> str:
        """The run directory, and what ``train`` would do there, by ``train``'s own checks."""
        from mnist_dist.resume import decide
        from mnist_dist.rundir import RunDir, check_output_dir

        if not (output_dir := self.config.train.output_dir):
            return (
                f"{RUNS_DIR}/<timestamp>: a new run per launch (--output-dir makes one resumable)"
            )
        self.layout = RunLayout(Path(output_dir))
        check_output_dir(self.layout.root)
        taking_over = claim.check(self.layout, claim.Holder.this_process())  # refuses a held one
        notes: list[str] = []
        resumption = decide(RunDir(self.layout, False), self.config, tell=notes.append)
        found, finished = resumption.checkpoint, resumption.finished
        if found is None:
            does = "new run"
        elif resumption.branch:
            does = f"branches from {found.path}"
        else:
            does = f"resumes from {found.path.name}"
        does += "".join(f"; {note}" for note in notes)
        if finished is not None:
            does = f"holds a finished run ({finished.epochs_completed} epoch(s)): nothing to train"
        if taking_over:
            does += f" ({taking_over})"
        return f"{self.layout.root}: writable; {does}"

    def _wandb(self) -> str:
        from mnist_dist.wandb_tracker import wandb_mode

        tracking = self.config.tracking
        if tracking.tracker != "wandb":
            return "off (--tracker none)"
        self.wandb_mode = wandb_mode(tracking)
        chosen = tracking.wandb_mode or os.environ.get("WANDB_MODE")
        sync = f"afterwards: wandb sync {self.layout.wandb}/offline-run-*"
        if self.wandb_mode == "online" and not chosen:
            url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
            host = url.hostname or "api.wandb.ai"
            port = url.port or (80 if url.scheme == "http" else 443)
            try:
                socket.create_connection((host, port), timeout=3.0).close()
            except OSError:
                self.wandb_mode = "offline"
                return (
                    f"offline: credentials found but {host}:{port} is unreachable from here; {sync}"
                )
        if self.wandb_mode == "offline":
            why = "as asked" if chosen else "no W&B credentials on this node"
            return f"offline ({why}); {sync}"
        if self.wandb_mode == "disabled":
            return "disabled"
        return f"online ({'as asked' if chosen else 'credentials found'})"


def doctor(config: Config, env_file: str | None = None) -> None:
    """Run every check and print each; raise ``UsageError`` naming the failures, if any. A
    failure does not stop the others, so one run shows everything that is wrong."""
    nodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1
    plan = LaunchPlan(config, _visible_gpus(), int(nodes), int(os.environ.get("SLURM_NODEID") or 0))
    job = os.environ.get("SLURM_JOB_ID")
    launcher = "`accelerate` is not on PATH: activate the environment mnist-dist is in"
    srun = "`srun` is not on PATH inside the job"
    checks = [
        ("launcher", lambda: _on_path("accelerate", launcher)),
        *([("srun", lambda: _on_path("srun", srun)), ("tasks", plan._tasks)] if job else []),
        ("processes", plan._processes),
        ("precision", plan._precision),
        ("batch", plan._batch),
        ("rendezvous", plan._rendezvous),
        ("data", plan._data),
        ("output", plan._output),
        ("wandb", plan._wandb),
    ]
    print(f"mnist-dist doctor: {'SLURM job ' + job if job else 'this machine'}", flush=True)
    width = max(len(name) for name, _ in checks)
    failed = []
    for name, check in checks:
        try:
            ok, detail = "ok", check()
        except UsageError as e:
            ok, detail = "FAIL", str(e)
            failed.append(f"{name}: {detail}")
        print(f"  {ok:4}  {name:{width}}  {detail}", flush=True)
    if failed:
        raise UsageError("pre-flight check failed: " + "; ".join(failed))
    if env_file:
        plan.write_env(env_file)


def _env_int(name: str, default: int) -> int:
    if not (value := os.environ.get(name)):
        return default
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _on_path(program: str, missing: str) -> str:
    if (path := shutil.which(program)) is None:
        raise UsageError(missing)
    return path


def _visible_gpus() -> int:
    """GPUs this node may use: SLURM's count (``2`` or ``a100:2``), else what CUDA sees."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = os.environ.get(name, "").rsplit(":", 1)[-1]
        if count.isdigit():
            return int(count)
    import torch

    return torch.cuda.device_count()


def _node_cpus() -> int:
    """CPUs this job may use on this node."""
    for name in ("SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-05,07]`` -> ``node03``), by ``scontrol``."""
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
