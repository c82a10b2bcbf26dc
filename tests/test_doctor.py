"""``mnist-dist doctor``: every check fails with a clear line, and the plan it writes is the
launch ``slurm/train.sbatch`` makes. (The checks inside real SLURM jobs are in test_slurm.)"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from helpers import free_port, read_plan, run_cli, run_here

from mnist_dist.errors import EXIT_USAGE


def doctor(data: Path, out: Path, *args: str, env: dict[str, str] | None = None, plan=None,
           run=run_here):  # fmt: skip
    """``mnist-dist doctor`` with this environment's ``accelerate`` on PATH, as in a job (in
    this process unless ``run`` is ``run_cli``)."""
    extra = ["--write-env", str(plan)] if plan else []
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return run("doctor", "--data-dir", str(data), "--output-dir", str(out), *extra, *args,
               env={"PATH": path, **(env or {})})  # fmt: skip


def test_a_sound_slurm_launch_passes_and_writes_its_plan(tiny_mnist, tmp_path):
    env = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "3", "SLURM_NODEID": "0",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "0", "SLURM_CPUS_ON_NODE": "4",
           "MNIST_DIST_PROCS_PER_NODE": "2", "MNIST_DIST_MAIN_ADDR": "127.0.0.1"}  # fmt: skip
    result = doctor(tiny_mnist, tmp_path / "run", "--batch-size", "60", env=env,
                    plan=tmp_path / "plan.env")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert "2 per node x 3 node(s) = world size 6, on CPU" in result.stdout
    assert "60 per step = 10 per process" in result.stdout
    assert read_plan(tmp_path / "plan.env") == {
        "MNIST_DIST_RUN_DIR": str(tmp_path / "run"),
        "MNIST_DIST_PROCS_PER_NODE": "2",
        "MNIST_DIST_NUM_PROCESSES": "6",
        "MNIST_DIST_MAIN_ADDR": "127.0.0.1",
        "MNIST_DIST_MAIN_PORT": str(15000 + 123456 % 10000),
    }


@pytest.mark.parametrize(
    "env, args, message",
    [
        (
            {"PATH": "/nonexistent"},
            (),
            "launcher: `accelerate` is not on PATH",
        ),
        (
            {"MNIST_DIST_MAIN_PORT": "70000"},
            (),
            "rendezvous: MNIST_DIST_MAIN_PORT must be a port (1-65535), got 70000",
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2"},
            (),
            "tasks: one `accelerate launch` per node needs --ntasks-per-node=1, got "
            "--ntasks-per-node=2 on 1 node(s)",
        ),
        (
            {"SLURM_GPUS_PER_NODE": "0", "MNIST_DIST_PROCS_PER_NODE": "two"},
            (),
            "processes: MNIST_DIST_PROCS_PER_NODE must be a positive integer, got 'two'",
        ),
        (
            {"SLURM_GPUS_PER_NODE": "2", "MNIST_DIST_PROCS_PER_NODE": "4"},
            (),
            "processes: MNIST_DIST_PROCS_PER_NODE=4 but this node has 2 GPU(s)",
        ),
        (
            {"SLURM_GPUS_PER_NODE": "0", "SLURM_NNODES": "2", "MNIST_DIST_PROCS_PER_NODE": "1"},
            ("--batch-size", "65"),
            "batch: --batch-size 65 is not divisible by world size 2",
        ),
        (
            {"SLURM_GPUS_PER_NODE": "0"},
            ("--mixed-precision", "fp16"),
            "precision: --mixed-precision fp16 needs a CUDA GPU and this node has none",
        ),
    ],
    ids=[
        "no-accelerate",
        "port-out-of-range",
        "tasks-per-node",
        "procs-not-a-number",
        "more-procs-than-gpus",
        "batch",
        "fp16-on-cpu",
    ],
)
def test_each_failed_check_is_named_in_one_line(env, args, message, tiny_mnist, tmp_path):
    result = doctor(tiny_mnist, tmp_path / "run", *args, env={"MNIST_DIST_MAIN_PORT": "1", **env},
                    plan=tmp_path / "plan.env")  # fmt: skip
    assert result.returncode == EXIT_USAGE
    [line] = result.stderr.splitlines()
    assert line.startswith("mnist-dist: error: pre-flight check failed: ")
    assert message in line
    assert not (tmp_path / "plan.env").exists()  # no plan from a failed check


def test_a_port_in_use_and_an_unwritable_output_fail(tiny_mnist, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = doctor(tiny_mnist, blocker / "run", env={"MNIST_DIST_MAIN_PORT": str(port)})
    assert result.returncode == EXIT_USAGE
    assert f"port {port} is in use on this node" in result.stderr
    assert f"cannot write to output directory {blocker / 'run'}" in result.stderr
    assert result.stdout.count("FAIL") == 2


def test_wandb_falls_back_offline_when_the_server_is_unreachable(tiny_mnist, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket is closed
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed}"}
    # W&B keeps module state of its own, and a child shows the real exit: a separate process.
    result = doctor(tiny_mnist, tmp_path / "run", "--tracker", "wandb", env=env,
                    plan=tmp_path / "plan.env", run=run_cli)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"offline: credentials found but 127.0.0.1:{closed} is unreachable" in result.stdout
    assert f"wandb sync {tmp_path / 'run' / 'wandb'}/offline-run-*" in result.stdout
    assert read_plan(tmp_path / "plan.env")["WANDB_MODE"] == "offline"


def test_doctor_refuses_what_train_refuses_and_says_what_train_will_do(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    port = {"MNIST_DIST_MAIN_PORT": str(free_port())}
    flags = ("--batch-size", "32", "--max-train-samples", "128")
    trained = run_here("train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), *flags,
                       "--epochs", "1")  # fmt: skip
    assert trained.returncode == 0, trained.stderr

    # Another training set changes the math: train refuses, and doctor with the same line.
    other = ("--batch-size", "32", "--max-train-samples", "64", "--epochs", "2")
    refused = run_here("train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), *other)
    [line] = refused.stderr.splitlines()
    assert refused.returncode == EXIT_USAGE and "was trained with --max-train-samples 128" in line
    checked = doctor(tiny_mnist, out, *other, env=port)
    assert checked.returncode == EXIT_USAGE
    assert f"output: {line.removeprefix('mnist-dist: error: ')}" in checked.stderr

    finished = doctor(tiny_mnist, out, *flags, "--epochs", "1", env=port)
    assert (
        f"{out}: writable; holds a finished run (1 epoch(s)): nothing to train" in finished.stdout
    )
    more = doctor(tiny_mnist, out, *flags, "--epochs", "2", env=port)
    assert f"{out}: writable; resumes from epoch-002-step-000000" in more.stdout
