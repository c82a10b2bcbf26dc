"""``mnist-dist doctor``: the pre-flight checks of a launch, which fill in its launch plan.

A multi-node job that is wrong usually does not fail: it hangs at the rendezvous, or trains on
the wrong number of processes. These checks run in seconds, before any process group exists;
``slurm/train.sbatch`` runs them on every job and launches from the plan they write."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mnist_dist import claim
from mnist_dist.claim import Holder
from mnist_dist.config import Config
from mnist_dist.errors import UsageError, first_line
from mnist_dist.launch import (
    MAIN_PORT_ENV,
    PROCS_PER_NODE_ENV,
    LaunchPlan,
    collective_timeout,
    main_addr,
    main_port,
    node_cpus,
    port_is_free,
    procs_per_node,
    visible_gpus,
    write_env,
)
from mnist_dist.layout import RUNS_DIR, RunLayout

WANDB_PROBE_SECONDS = 3.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Doctor:
    """Runs every check, collecting results instead of stopping at the first failure, so one
    run shows everything that is wrong."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.in_slurm = bool(os.environ.get("SLURM_JOB_ID"))
        self.gpus = visible_gpus()
        nodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1
        self.plan = LaunchPlan(int(nodes), int(os.environ.get("SLURM_NODEID") or 0))
        self.checks: list[Check] = []

    def run(self) -> list[Check]:
        """Every check, in order; each that passes has filled in its part of ``self.plan``."""
        launcher = "`accelerate` is not on PATH: activate the environment mnist-dist is in"
        checks: list[tuple[str, Callable[[], str]]] = [
            ("launcher", lambda: _on_path("accelerate", launcher))
        ]
        if self.in_slurm:
            srun = "`srun` is not on PATH inside the job"
            checks += [("srun", lambda: _on_path("srun", srun)), ("tasks", self._tasks)]
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
                self.checks.append(Check(name, True, check()))
            except UsageError as e:
                self.checks.append(Check(name, False, str(e)))
        return self.checks

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
        plan.procs_per_node = procs_per_node(gpus)
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
        from mnist_dist.distributed import precision_supported

        precision = self.config.train.mixed_precision
        if precision_supported(precision, self.gpus):
            return precision
        if precision == "fp16":
            raise UsageError("--mixed-precision fp16 needs GPUs and this node has none; use bf16")
        raise UsageError(
            "--mixed-precision bf16 is not supported by this node's GPUs; use fp16 or no"
        )

    def _batch(self) -> str:
        world_size = self.plan.num_processes
        per_device = self.config.train.per_device_batch_size(world_size)
        return f"{self.config.train.global_batch_size} per step = {per_device} per process"

    def _rendezvous(self) -> str:
        plan = self.plan
        plan.main_port = main_port()
        plan.main_addr = main_addr()
        try:
            socket.getaddrinfo(plan.main_addr, plan.main_port)
        except OSError as e:
            raise UsageError(f"main address {plan.main_addr} does not resolve: {e}") from None
        where = f"{plan.main_addr}:{plan.main_port}"
        timeout = collective_timeout()  # a bad value fails here, before anything starts
        if timeout is not None:
            where += f" (collectives time out after {timeout.total_seconds():g}s)"
        if plan.node_rank != 0:
            return f"{where}, checked on node 0"
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
        from mnist_dist.rundir import check_output_dir

        output_dir = self.config.train.output_dir
        if not output_dir:
            self.plan.run_dir = Path(RUNS_DIR)
            return (
                f"{RUNS_DIR}/<timestamp>: a new run per launch (--output-dir makes one resumable)"
            )
        path = self.plan.run_dir = Path(output_dir)
        check_output_dir(path)
        # A held directory is refused.
        taking_over = claim.check(RunLayout(path), Holder.this_process())
        plan = what_train_does(path, self.config)
        return f"{path}: writable; {plan}" + (f" ({taking_over})" if taking_over else "")

    def _wandb(self) -> str:
        from mnist_dist.wandb_tracker import wandb_mode

        tracking = self.config.tracking
        if tracking.tracker != "wandb":
            return "off (--tracker none)"
        mode = wandb_mode(tracking)
        chosen = tracking.wandb_mode or os.environ.get("WANDB_MODE")
        sync = f"afterwards: wandb sync {RunLayout(self.plan.run_dir).wandb}/offline-run-*"
        if mode == "online" and not chosen:
            url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
            host = url.hostname or "api.wandb.ai"
            port = url.port or (80 if url.scheme == "http" else 443)
            where = f"{host}:{port}"
            try:
                socket.create_connection((host, port), timeout=WANDB_PROBE_SECONDS).close()
            except OSError:
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


def what_train_does(path: Path, config: Config) -> str:
    """What ``train`` would do in the run directory ``path``, in words, through the checks
    ``train`` itself makes there (raising the same ``UsageError`` it would refuse with)."""
    from mnist_dist.resume import decide
    from mnist_dist.rundir import RunDir

    notes: list[str] = []
    resumption = decide(RunDir(RunLayout(path), False), config, tell=notes.append)
    finished, found = resumption.finished, resumption.checkpoint
    if finished is not None:
        return f"holds a finished run ({finished.epochs_completed} epoch(s)): nothing to train"
    if found is None:
        return "new run" + "".join(f"; {note}" for note in notes)
    verb = "branches from" if resumption.branch else "resumes from"
    where = found.path if resumption.branch else found.path.name
    return f"{verb} {where}" + "".join(f"; {n}" for n in notes)


def _on_path(program: str, missing: str) -> str:
    if (path := shutil.which(program)) is None:
        raise UsageError(missing)
    return path


def doctor(config: Config, env_file: str | None = None) -> LaunchPlan:
    """Run every check and print them; raise ``UsageError`` naming the failures, if any."""
    checkup = Doctor(config)
    checks = checkup.run()
    job = os.environ.get("SLURM_JOB_ID")
    print(f"mnist-dist doctor: {'SLURM job ' + job if job else 'this machine'}", flush=True)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'ok' if c.ok else 'FAIL':4}  {c.name:{width}}  {c.detail}", flush=True)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise UsageError(
            "pre-flight check failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )
    if env_file:
        write_env(checkup.plan, env_file)
    return checkup.plan
