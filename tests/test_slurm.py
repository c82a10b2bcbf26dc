"""slurm/train.sbatch against a real SLURM: Debian's slurmctld, slurmd and munge run a one-node
cluster on localhost for this module (``tests/slurm/cluster.sh``; ``.ci/run`` installs them).

Jobs ask for ``--gpus-per-node 0 --cpus-per-task 2`` (this node has no GPUs) and two CPU ranks
through ``MNIST_DIST_PROCS_PER_NODE``, the way a user on a CPU partition would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    _env,
    assert_bit_identical,
    fault_env,
    free_port,
    launch_cli,
    read_jsonl,
    read_plan,
    read_summary,
    run_cli,
)

from mnist_dist.layout import (
    METRICS_FILE,
    MODEL_FILE,
    STATES,
    STATUS_FILE,
    STEPS_FILE,
    STOP_FILE,
    SUMMARY_FILE,
    RunLayout,
)

SBATCH = ROOT / "slurm" / "train.sbatch"
LAUNCH_NODE = ROOT / "slurm" / "launch-node.sh"
CLUSTER = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=2")
# The RunLayout properties that name a file or folder directly in the run directory.
RUN_DIR_FILES = (
    "config", "metrics", "steps", "summary", "model", "status", "stop", "wandb_run_id", "wandb",
    "checkpoints",
)  # fmt: skip


def needs_cluster(test):
    """A test that submits jobs to the local SLURM cluster and trains on the real MNIST."""
    return pytest.mark.slurm(pytest.mark.dataset(test))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """A running one-node SLURM; yields the environment its clients need."""
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not _which(c)]
    problem = f"SLURM not installed ({', '.join(missing)} missing)" if missing else None
    if not problem and os.geteuid() != 0:
        problem = "a local SLURM cluster needs root"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI must provide it (.ci/run installs it)")
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("slurm")
    ports = {"SLURM_TEST_CTLD_PORT": str(free_port()), "SLURM_TEST_SLURMD_PORT": str(free_port())}
    subprocess.run(
        ["bash", str(CLUSTER), "start", str(folder)],
        check=True,
        env={**os.environ, **ports},
        timeout=120,
    )
    try:
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=60)


def _which(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")


def job_env(cluster: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would hand to sbatch: the project's environment on PATH, SLURM's
    configuration, and no W&B credentials (so W&B runs offline, as on most compute nodes)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", ""), "/usr/sbin"])
    return _env({**cluster, "PATH": path, "NETRC": str(netrc), **extra})


def sbatch(
    env: dict[str, str], workdir: Path, *args: str, options: tuple[str, ...] = CPU_JOB
) -> str:
    """Submit the batch script from ``workdir`` (its logs go there); the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *options, str(SBATCH), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_state(
    env: dict[str, str], job_id: str, states: set[str], timeout: float = 600
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states}: {job_info(env, job_id)}")


def finish(env: dict[str, str], job_id: str, timeout: float = 900) -> dict[str, str]:
    return wait_for_state(env, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout)


def logs(workdir: Path, job_id: str) -> tuple[str, str]:
    out = workdir / f"mnist-dist-{job_id}.out"
    err = workdir / f"mnist-dist-{job_id}.err"
    return out.read_text(), err.read_text() if err.exists() else ""


def launch_words(log: str) -> list[str]:
    """The words of the first ``accelerate launch`` command a log shows."""
    launch = next(line for line in log.splitlines() if "accelerate launch" in line)
    return shlex.split(launch.split(": ", 1)[1])


@needs_cluster
def test_the_first_submission_works_from_a_folder_without_a_logs_folder(
    cluster, tiny_mnist, tmp_path
):
    # A newcomer's first job: a fresh folder, no `mkdir -p logs`, the script's own log paths
    # (the CPU options only because this node has no GPUs and 2 CPUs). A log path in a missing
    # folder would fail the job with no output anywhere (JobState=FAILED
    # Reason=JobLaunchFailure).
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    env = job_env(cluster, tmp_path)
    run_dir = tmp_path / "run"
    job = sbatch(env, workdir, "--data-dir", str(tiny_mnist), "--output-dir", str(run_dir),
                 "--epochs", "1", "--tracker", "none")  # fmt: skip
    info = finish(env, job)
    assert info["JobState"] == "COMPLETED", info
    assert sorted(p.name for p in workdir.iterdir()) == [
        f"mnist-dist-{job}.err", f"mnist-dist-{job}.out"
    ]  # fmt: skip
    out, _ = logs(workdir, job)
    assert f"finished: {run_dir}/summary.json" in out
    assert read_summary(run_dir)["epochs_completed"] == 1


@needs_cluster
def test_the_gpu_default_on_a_cluster_without_gpus_is_refused_as_the_readme_says(cluster, tmp_path):
    # SLURM refuses the job before the script can say anything, so the README must.
    env = job_env(cluster, tmp_path)
    refused = subprocess.run(
        ["sbatch", str(SBATCH), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    message = "Invalid generic resource (gres) specification"
    assert message in refused.stderr
    # The README's first SLURM commands, and the note right under them.
    clusters = (ROOT / "README.md").read_text().split("## Clusters (SLURM)")[1]
    opening = clusters[: clusters.index("Submit from the project folder")]
    assert "sbatch --gpus-per-node 0 slurm/train.sbatch --data-dir" in opening
    assert message in opening
    assert "mkdir" not in opening


@needs_cluster
def test_sbatch_trains_two_ranks_on_real_mnist_and_logs_the_launch(cluster, mnist_dir, tmp_path):
    env = job_env(cluster, tmp_path, MNIST_DIST_PROCS_PER_NODE="2")
    run_dir = tmp_path / "run"
    job = sbatch(env, tmp_path, "--data-dir", str(mnist_dir), "--output-dir", str(run_dir),
                 "--epochs", "1")  # fmt: skip
    info = finish(env, job)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out + err
    assert info["ExitCode"] == "0:0"

    summary = read_summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["epochs_completed"] == 1
    # One epoch of the reference recipe (the full run reaches 99.1-99.2% after ten).
    assert summary["test_total"] == 10000
    assert summary["test_accuracy"] >= 0.975, summary

    # The resolved launch: the doctor's plan, then one `accelerate launch` for this node with
    # its machine rank, the allocation's first host and the job's port.
    assert "ok    processes   2 per node x 1 node(s) = world size 2, on CPU" in out
    node = socket.gethostname().split(".")[0]
    assert f"mnist-dist: node 0 ({node}): accelerate launch " in out
    words = launch_words(out)
    for flag, value in (
        ("--num_machines", "1"),
        ("--num_processes", "2"),
        ("--machine_rank", "0"),
        ("--main_process_ip", node),
        ("--main_process_port", str(15000 + int(job) % 10000)),
    ):
        assert words[words.index(flag) + 1] == value
    assert words[words.index("train") + 1 :][-6:] == [
        "--data-dir", str(mnist_dir), "--output-dir", str(run_dir), "--epochs", "1",
    ]  # fmt: skip
    assert "finished" in out
    # W&B ran offline on the compute node, one run, and the log says how to sync it.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert "wandb sync" in out


def preemptible_args(data_dir: Path, run_dir: Path) -> list[str]:
    """4096 real images, batch 64: 64 steps per epoch, 2 epochs, a checkpoint every 10 steps."""
    return [
        "--data-dir", str(data_dir), "--output-dir", str(run_dir), "--epochs", "2",
        "--max-train-samples", "4096", "--max-eval-samples", "1000",
        "--checkpoint-every", "10", "--log-every", "1",
    ]  # fmt: skip


def wait_for_steps(run_dir: Path, env: dict[str, str], job: str, steps: int) -> None:
    deadline = time.monotonic() + 300
    path = run_dir / STEPS_FILE
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        assert job_info(env, job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.1)
    raise AssertionError(f"step {steps} not reached")


def release_requeued(env: dict[str, str], job: str) -> dict[str, str]:
    """Wait for the requeue; SLURM holds a requeued job for two minutes (its BeginTime), which
    a test does not need to sit through. Not less than a few seconds, though: the requeue
    revokes the job's credential with one-second resolution, and a launch within the same
    second fails the job ("Job credential revoked")."""
    info = wait_for_state(env, job, {"PENDING"}, timeout=300)
    subprocess.run(
        ["scontrol", "update", f"JobId={job}", "StartTime=now+5"], env=env, check=True, timeout=30
    )
    return info


@needs_cluster
def test_usr1_before_the_time_limit_requeues_and_the_job_resumes_bit_identical(
    cluster, mnist_dir, tmp_path
):
    args = preemptible_args(mnist_dir, tmp_path / "run")
    reference = launch_cli("train", *preemptible_args(mnist_dir, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = job_env(cluster, tmp_path, MNIST_DIST_PROCS_PER_NODE="2", **fault_env(STEP_SLEEP=0.1))
    job = sbatch(env, tmp_path, *args)
    run_dir = tmp_path / "run"
    wait_for_steps(run_dir, env, job, 20)
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    release_requeued(env, job)
    info = finish(env, job)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out + err
    assert info["Restarts"] == "1"

    assert "SIGUSR1 (time limit or preemption): asking the ranks to checkpoint and stop" in out
    assert f"requeueing job {job} (requeue 1 of at most 20)" in out
    resumed = re.search(r"resumed from \S+: epoch 1, step (\d+) \(global step (\d+)\)", out)
    assert resumed, out
    assert 20 <= int(resumed[2]) < 64  # mid-epoch, from the stop's own checkpoint
    assert f"job {job}, attempt 2" in out

    # One run: every step recorded once, the final weights those of an uninterrupted run.
    assert [r["global_step"] for r in read_jsonl(run_dir / STEPS_FILE)] == list(range(1, 129))
    assert read_summary(run_dir)["world_size"] == 2
    assert_bit_identical(run_dir / MODEL_FILE, tmp_path / "reference" / MODEL_FILE)
    # Both attempts wrote into the same W&B run.
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    assert len({p.name.rsplit("-", 1)[1] for p in offline}) == 1


@needs_cluster
def test_requeues_are_capped_and_a_failed_run_is_not_requeued(cluster, mnist_dir, tmp_path):
    # The cap: a second warning signal once the allowed requeues are used up.
    env = job_env(
        cluster,
        tmp_path,
        MNIST_DIST_PROCS_PER_NODE="2",
        MNIST_DIST_MAX_REQUEUES="0",
        **fault_env(STEP_SLEEP=0.1),
    )
    job = sbatch(env, tmp_path, *preemptible_args(mnist_dir, tmp_path / "capped"))
    wait_for_steps(tmp_path / "capped", env, job, 5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    info = finish(env, job)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "FAILED", out + err
    assert info["Restarts"] == "0"
    assert "MNIST_DIST_MAX_REQUEUES=0 is reached; resubmit with --output-dir" in err
    assert json.loads((tmp_path / "capped" / STATUS_FILE).read_text())["state"] == "stopped"

    # A run that fails (here: a NaN loss) is reported and not requeued.
    env = job_env(cluster, tmp_path, MNIST_DIST_PROCS_PER_NODE="2", **fault_env(NAN_AT_STEP=3))
    job = sbatch(env, tmp_path, *preemptible_args(mnist_dir, tmp_path / "diverged"))
    info = finish(env, job)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "FAILED", out + err
    assert info["Restarts"] == "0"
    assert "training failed (status 'diverged'" in err
    assert "not requeued" in err


@needs_cluster
def test_launch_step_on_two_nodes_forms_one_job_of_world_size_two(cluster, mnist_dir, tmp_path):
    """The script's launch step as srun runs it on a 2-node allocation: the batch host's doctor
    writes the plan, then each node's launcher, with that node's SLURM variables."""
    node = socket.gethostname().split(".")[0]
    job_id = str(20000 + os.getpid() % 10000)
    slurm = {
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": f"{node},localhost",
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_ON_NODE": "1",
        "SLURM_GPUS_PER_NODE": "0",
    }  # fmt: skip
    env = job_env(cluster, tmp_path, MNIST_DIST_PROCS_PER_NODE="1", **slurm)
    run_dir = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--output-dir", str(run_dir), "--epochs", "1",
            "--max-train-samples", "2048", "--max-eval-samples", "1000"]  # fmt: skip
    plan_file = tmp_path / "plan.env"
    doctor = run_cli("doctor", "--write-env", str(plan_file), *args,
                     env={**env, "SLURM_NODEID": "0"})  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    plan = read_plan(plan_file)
    assert plan["MNIST_DIST_NUM_PROCESSES"] == "2"
    assert plan["MNIST_DIST_MAIN_ADDR"] == node

    launchers = []
    for rank in (0, 1):
        node_env = {**env, **plan, "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank),
                    "SLURM_LOCALID": "0", "SLURMD_NODENAME": [node, "localhost"][rank]}  # fmt: skip
        launchers.append(
            subprocess.Popen(
                ["bash", str(LAUNCH_NODE), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=node_env,
                cwd=tmp_path,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(outputs)
    for rank, output in enumerate(outputs):
        words = launch_words(output)
        assert words[words.index("--machine_rank") + 1] == str(rank)
        assert words[words.index("--num_machines") + 1] == "2"
    assert read_summary(run_dir)["world_size"] == 2
    # The same job as two ranks on one machine, bit for bit: the gradients were synchronised.
    one_node = launch_cli("train", *args[:3], str(tmp_path / "one-node"), *args[4:])
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert_bit_identical(run_dir / MODEL_FILE, tmp_path / "one-node" / MODEL_FILE)


@needs_cluster
@pytest.mark.parametrize(
    "problem, env_extra, expected",
    [
        (
            "unreadable data directory",
            {},
            "data: data directory {missing} does not exist or is not a folder",
        ),
        (
            "more processes than CPUs",
            {"MNIST_DIST_PROCS_PER_NODE": "3"},
            "processes: MNIST_DIST_PROCS_PER_NODE=3 CPU processes but this node has 2 CPU(s)",
        ),
    ],
)
def test_preflight_fails_fast_with_a_clear_message(
    problem, env_extra, expected, cluster, mnist_dir, tmp_path
):
    missing = tmp_path / "no-such-data"
    data_dir = missing if problem == "unreadable data directory" else mnist_dir
    env = job_env(cluster, tmp_path, **env_extra)
    started = time.monotonic()
    job = sbatch(env, tmp_path, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"))
    info = finish(env, job, timeout=120)
    out, err = logs(tmp_path, job)
    assert info["JobState"] == "FAILED"
    assert time.monotonic() - started < 60
    assert expected.format(missing=missing) in err
    assert "pre-flight check failed (above); nothing was launched" in err
    assert "accelerate launch" not in out
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_the_batch_script_reads_the_run_directory_through_the_layouts_names():
    """train.sbatch cannot import mnist_dist.layout: the names it uses must still be its."""
    text = SBATCH.read_text()
    assert "mnist_dist/layout.py" in text  # where a reader of the script finds the contract
    named = set(re.findall(r"\$run_dir/([\w.-]+)", text))
    assert {STATUS_FILE, STOP_FILE, SUMMARY_FILE} <= named
    assert named <= {getattr(RunLayout(Path()), p).name for p in RUN_DIR_FILES}
    case = text[text.index("case $state in") : text.index("esac")]
    assert '["state"]' in text
    states = re.findall(r"^\s+(\w+)\)$", case, re.MULTILINE)
    assert states and set(states) <= set(STATES)
