"""``mnist-dist doctor``: pre-flight checks for a launch, and the launch plan they imply.

A multi-node job that is wrong in any way usually does not fail: it hangs at the rendezvous
until a timeout, or trains on the wrong number of processes. The checks here run in seconds,
before any process group exists: the SLURM task layout, the process count against the GPUs or
CPUs the node got, the batch size against the world size, the rendezvous address and port,
the data, the output directory and the W&B mode. ``slurm/train.sbatch`` runs them on every
job and launches from the plan they print (``--write-env``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mnist_dist.config import Config
from mnist_dist.errors import UsageError, first_line
from mnist_dist.layout import RUNS_DIR, RunLayout, parse_resume

PROCS_PER_NODE_ENV = "MNIST_DIST_PROCS_PER_NODE"
MAIN_ADDR_ENV = "MNIST_DIST_MAIN_ADDR"
MAIN_PORT_ENV = "MNIST_DIST_MAIN_PORT"
DEFAULT_PORT = 29500
# Lightning's rule: two jobs that share a node get different ports.
SLURM_PORT_BASE = 15000
WANDB_PROBE_SECONDS = 3.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class LaunchPlan:
    """What one job launches: ``nodes`` x ``procs_per_node`` processes meeting at
    ``main_addr:main_port``, writing to ``run_dir``."""

    nodes: int = 1
    node_rank: int = 0
    procs_per_node: int = 1
    main_addr: str = "127.0.0.1"
    main_port: int = DEFAULT_PORT
    run_dir: Path = Path("runs")
    wandb_mode: str | None = None  # None: tracking off
    checks: list[Check] = field(default_factory=list)

    @property
    def num_processes(self) -> int:
        return self.nodes * self.procs_per_node

    def env(self) -> dict[str, str]:
        """The plan as environment variables for ``slurm/launch-node.sh``."""
        env = {
            "MNIST_DIST_RUN_DIR": str(self.run_dir),
            PROCS_PER_NODE_ENV: str(self.procs_per_node),
            "MNIST_DIST_NUM_PROCESSES": str(self.num_processes),
            MAIN_ADDR_ENV: self.main_addr,
            MAIN_PORT_ENV: str(self.main_port),
        }
        if self.wandb_mode:
            env["WANDB_MODE"] = self.wandb_mode
        return env


def _positive_int(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def slurm_gpus_on_node() -> int | None:
    """GPUs the scheduler gave this node, if it says: ``SLURM_GPUS_ON_NODE``, else
    ``SLURM_GPUS_PER_NODE`` (``2`` or ``a100:2``)."""
    on_node = os.environ.get("SLURM_GPUS_ON_NODE")
    if on_node and on_node.isdigit():
        return int(on_node)
    per_node = os.environ.get("SLURM_GPUS_PER_NODE")
    if per_node:
        count = per_node.rsplit(":", 1)[-1]
        if count.isdigit():
            return int(count)
    return None


def visible_gpus() -> int:
    """GPUs this node can use: the scheduler's figure, else what CUDA sees."""
    from_slurm = slurm_gpus_on_node()
    if from_slurm is not None:
        return from_slurm
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
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UsageError(
            f"cannot expand SLURM_JOB_NODELIST {nodelist!r}: {first_line(e)}"
        ) from None
    if not out:
        raise UsageError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return out[0]


def port_is_free(port: int) -> bool:
    """Whether the rendezvous could listen on ``port`` here (as torch's TCPStore would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _wandb_host_reachable() -> tuple[str, bool]:
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=WANDB_PROBE_SECONDS).close()
    except OSError:
        return f"{host}:{port}", False
    return f"{host}:{port}", True


class Doctor:
    """Runs every check, collecting results instead of stopping at the first failure, so one
    run shows everything that is wrong."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.in_slurm = bool(os.environ.get("SLURM_JOB_ID"))
        self.gpus = visible_gpus()
        self.plan = LaunchPlan(
            nodes=int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1),
            node_rank=int(os.environ.get("SLURM_NODEID") or 0),
        )

    def run(self) -> LaunchPlan:
        checks: list[tuple[str, Callable[[], str]]] = [("launcher", self._launcher)]
        if self.in_slurm:
            checks += [("srun", self._srun), ("tasks", self._tasks)]
        checks += [
            ("processes", self._processes),
            ("precision", self._precision),
            ("batch", self._batch),
            ("rendezvous", self._rendezvous),
            ("data", self._data),
            ("output", self._output),
            ("wandb", self._wandb),
        ]
        for name, check in checks:
            try:
                self.plan.checks.append(Check(name, True, check()))
            except UsageError as e:
                self.plan.checks.append(Check(name, False, str(e)))
        return self.plan

    def _launcher(self) -> str:
        path = shutil.which("accelerate")
        if path is None:
            raise UsageError(
                "`accelerate` is not on PATH: activate the environment mnist-dist is in"
            )
        return path

    def _srun(self) -> str:
        path = shutil.which("srun")
        if path is None:
            raise UsageError("`srun` is not on PATH inside the job")
        return path

    def _tasks(self) -> str:
        nodes = self.plan.nodes
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
        tasks = os.environ.get("SLURM_NTASKS")
        if (per_node and per_node != "1") or (tasks and int(tasks) != nodes):
            got = f"--ntasks-per-node={per_node}" if per_node else f"--ntasks={tasks}"
            raise UsageError(
                f"one `accelerate launch` per node needs --ntasks-per-node=1, got {got} on "
                f"{nodes} node(s): accelerate starts each node's processes itself"
            )
        return f"1 per node on {nodes} node(s)"

    def _processes(self) -> str:
        plan, gpus = self.plan, self.gpus
        override = os.environ.get(PROCS_PER_NODE_ENV)
        plan.procs_per_node = (
            _positive_int(PROCS_PER_NODE_ENV, override) if override else max(gpus, 1)
        )
        layout = (
            f"{plan.procs_per_node} per node x {plan.nodes} node(s) = world size "
            f"{plan.num_processes}"
        )
        if gpus:
            if plan.procs_per_node > gpus:
                raise UsageError(
                    f"{PROCS_PER_NODE_ENV}={plan.procs_per_node} but this node has {gpus} GPU(s); "
                    "ask for more with --gpus-per-node or start fewer processes"
                )
            return f"{layout}, one per GPU ({gpus} on this node)"
        cpus = node_cpus()
        if plan.procs_per_node > cpus:
            raise UsageError(
                f"{PROCS_PER_NODE_ENV}={plan.procs_per_node} CPU processes but this node has "
                f"{cpus} CPU(s) for the job; ask for more with --cpus-per-task or start fewer "
                "processes"
            )
        return f"{layout}, on CPU (no GPU on this node; {cpus} CPU(s))"

    def _precision(self) -> str:
        precision = self.config.train.mixed_precision
        if precision == "fp16" and not self.gpus:
            raise UsageError("--mixed-precision fp16 needs GPUs and this node has none; use bf16")
        return precision

    def _batch(self) -> str:
        world_size = self.plan.num_processes
        per_device = self.config.train.per_device_batch_size(world_size)
        return f"{self.config.train.global_batch_size} per step = {per_device} per process"

    def _rendezvous(self) -> str:
        plan = self.plan
        job_id = os.environ.get("SLURM_JOB_ID", "")
        port = os.environ.get(MAIN_PORT_ENV)
        if port:
            plan.main_port = _positive_int(MAIN_PORT_ENV, port)
            if plan.main_port > 65535:
                raise UsageError(f"{MAIN_PORT_ENV} must be a port (1-65535), got {port}")
        elif job_id.isdigit():
            plan.main_port = SLURM_PORT_BASE + int(job_id) % 10000
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        plan.main_addr = os.environ.get(MAIN_ADDR_ENV) or (
            first_host(nodelist) if nodelist else "127.0.0.1"
        )
        try:
            socket.getaddrinfo(plan.main_addr, plan.main_port)
        except OSError as e:
            raise UsageError(f"main address {plan.main_addr} does not resolve: {e}") from None
        where = f"{plan.main_addr}:{plan.main_port}"
        if plan.node_rank != 0:
            return f"{where} (checked on node 0)"
        if not port_is_free(plan.main_port):
            raise UsageError(
                f"port {plan.main_port} is in use on this node; set {MAIN_PORT_ENV} to a free port"
            )
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
        from mnist_dist.checkpoint import complete_checkpoints
        from mnist_dist.rundir import check_output_dir

        output_dir = self.config.train.output_dir
        if not output_dir:
            self.plan.run_dir = Path(RUNS_DIR)
            return (
                f"{RUNS_DIR}/<timestamp>: a new run per launch (--output-dir makes one resumable)"
            )
        path = self.plan.run_dir = Path(output_dir)
        check_output_dir(path)
        found = complete_checkpoints(RunLayout(path).checkpoints)
        if found and parse_resume(self.config.checkpoint.resume).auto:
            return f"{path}: writable; resumes from {found[-1].name}"
        return f"{path}: writable; new run"

    def _wandb(self) -> str:
        from mnist_dist.tracking import wandb_mode

        tracking = self.config.tracking
        if tracking.tracker != "wandb":
            return "off (--tracker none)"
        mode = wandb_mode(tracking)
        chosen = tracking.wandb_mode or os.environ.get("WANDB_MODE")
        sync = f"afterwards: wandb sync {RunLayout(self.plan.run_dir).wandb}/offline-run-*"
        if mode == "online" and not chosen:
            where, reachable = _wandb_host_reachable()
            if not reachable:
                mode = "offline"
                self.plan.wandb_mode = mode
                return f"offline: credentials found but {where} is unreachable from here; {sync}"
        self.plan.wandb_mode = mode
        if mode == "offline":
            why = "as asked" if chosen else "no W&B credentials on this node"
            return f"offline ({why}); {sync}"
        if mode == "disabled":
            return "disabled"
        return f"online ({'as asked' if chosen else 'credentials found'})"


def format_checks(plan: LaunchPlan) -> str:
    width = max(len(c.name) for c in plan.checks)
    return "\n".join(
        f"  {'ok' if c.ok else 'FAIL':4}  {c.name:{width}}  {c.detail}" for c in plan.checks
    )


def write_env(plan: LaunchPlan, path: str | os.PathLike[str]) -> None:
    """The plan as ``export NAME=value`` lines a shell can source."""
    lines = [f"export {k}={shlex.quote(v)}\n" for k, v in plan.env().items()]
    try:
        Path(path).write_text("".join(lines))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def doctor(config: Config, env_file: str | None = None) -> LaunchPlan:
    """Run every check and print them; raise ``UsageError`` naming the failures, if any."""
    plan = Doctor(config).run()
    job = os.environ.get("SLURM_JOB_ID")
    print(f"mnist-dist doctor: {'SLURM job ' + job if job else 'this machine'}", flush=True)
    print(format_checks(plan), flush=True)
    failed = [c for c in plan.checks if not c.ok]
    if failed:
        raise UsageError(
            "pre-flight check failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )
    if env_file:
        write_env(plan, env_file)
    return plan
