"""One job across two real hosts: ``tests/slurm/cluster.sh start DIR --nodes 2`` runs two
slurmd, each in its own network, host-name and mount namespaces (node1 and node2 on a private
bridge), under one slurmctld. Jobs are submitted as the README says (``sbatch --nodes 2
--gpus-per-node 0 slurm/train.sbatch ...``) and train on a small slice of the real MNIST.

The uninterrupted two-node run of ``resumable_args`` is the reference that the runs a node dies
in, or that are preempted, must finish bit-identical to.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import (
    free_port,
    read_jsonl,
    read_summary,
)
from test_slurm import (
    CLUSTER,
    _which,
    finish,
    job_env,
    launch_words,
    logs,
    sbatch,
)

from mnist_dist.layout import STEPS_FILE

TWO_NODES = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2")
# Seconds a rank waits in a collective for a silent peer in these tests (the batch script's
# default is 60; the README gives the times measured with it).
TIMEOUT = 15


def multinode(test):
    return pytest.mark.multinode(pytest.mark.slurm(pytest.mark.dataset(test)))


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {"SLURM_CONF": str(folder / "slurm.conf")}

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run(
            ["bash", str(CLUSTER), args[0], str(self.folder), *args[1:]],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    def trainers(self, node: int) -> list[int]:
        """The training processes (not the launcher) running on ``node``."""
        found = []
        for pid in self.run("pids", str(node)).split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in cmd and b"mnist_dist" in cmd and b"accelerate" not in cmd[1]:
                found.append(int(pid))
        return found


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory) -> Cluster:
    """A running two-node SLURM."""
    missing = [
        c for c in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter") if not _which(c)
    ]
    problem = f"not installed: {', '.join(missing)}" if missing else None
    if not problem and os.geteuid() != 0:
        problem = "a local SLURM cluster across namespaces needs root"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must provide it (.ci/run installs it)")
        pytest.skip(problem)
    cluster = Cluster(tmp_path_factory.mktemp("slurm2"))
    ports = {"SLURM_TEST_CTLD_PORT": str(free_port()), "SLURM_TEST_SLURMD_PORT": str(free_port())}
    subprocess.run(
        ["bash", str(CLUSTER), "start", str(cluster.folder), "--nodes", "2"],
        check=True,
        env={**os.environ, **ports},
        timeout=120,
    )
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(cluster.folder)], timeout=120)


def resumable_args(data_dir: Path, run_dir: Path) -> list[str]:
    """2048 real images, global batch 64: 32 steps per epoch, 2 epochs, a checkpoint every 8."""
    return [
        "--data-dir", str(data_dir), "--output-dir", str(run_dir), "--epochs", "2",
        "--max-train-samples", "2048", "--max-eval-samples", "500",
        "--checkpoint-every", "8", "--log-every", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(cluster2, mnist_dir, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted two-node run (one process per node): its run directory and job log."""
    folder = tmp_path_factory.mktemp("reference")
    env = job_env(cluster2.env, folder)
    job = sbatch(env, folder, *resumable_args(mnist_dir, folder / "run"), options=TWO_NODES)
    info = finish(env, job)
    out, err = logs(folder, job)
    assert info["JobState"] == "COMPLETED", out + err
    return folder / "run", out


def node_launches(out: str) -> dict[str, list[str]]:
    """Each node's `accelerate launch` words, by host name."""
    found = {}
    for line in out.splitlines():
        if m := re.match(r"mnist-dist: node \d+ \((\w+)\): accelerate launch ", line):
            found[m[1]] = launch_words(line)
    return found


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@multinode
def test_one_job_trains_across_two_hosts(reference):
    run_dir, out = reference
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["epochs_completed"] == 2
    config = (run_dir / "config.yaml").read_text()
    assert "num_nodes: 2" in config
    assert "rank 0 on node1" in config and "rank 1 on node2" in config
    # One launcher per host, each with its own machine rank, meeting at the first host.
    launches = node_launches(out)
    assert sorted(launches) == ["node1", "node2"]
    job = re.search(r"job (\d+), attempt 1", out)[1]
    for rank, node in enumerate(("node1", "node2")):
        assert flag(launches[node], "--machine_rank") == str(rank)
        assert flag(launches[node], "--num_machines") == "2"
        assert flag(launches[node], "--main_process_ip") == "node1"
        assert flag(launches[node], "--main_process_port") == str(15000 + int(job) % 10000)
    # The shared run directory holds one record of each step and one W&B run: rank 0 wrote.
    assert [r["global_step"] for r in read_jsonl(run_dir / STEPS_FILE)] == list(range(1, 65))
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@multinode
def test_two_processes_per_node_form_one_group_of_four(cluster2, mnist_dir, tmp_path):
    env = job_env(cluster2.env, tmp_path, MNIST_DIST_PROCS_PER_NODE="2")
    run_dir = tmp_path / "run"
    job = sbatch(env, tmp_path, "--data-dir", str(mnist_dir), "--output-dir", str(run_dir),
                 "--epochs", "1", "--max-train-samples", "512", "--max-eval-samples", "200",
                 "--tracker", "none", options=TWO_NODES)  # fmt: skip
    info = finish(env, job)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out + err
    assert "ok    processes   2 per node x 2 node(s) = world size 4, on CPU" in out
    summary = read_summary(run_dir)
    assert summary["world_size"] == 4
    config = (run_dir / "config.yaml").read_text()
    assert "num_nodes: 2" in config
    for rank, node in enumerate(("node1", "node1", "node2", "node2")):
        assert f"rank {rank} on {node}" in config
