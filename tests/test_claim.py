"""One training per run directory, a status that tells the truth, and messages whose command
continues the run: real trainings started side by side, killed, stopped and continued."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from helpers import (
    _env,
    assert_bit_identical,
    fault_env,
    launch_cli,
    launch_command,
    make_tiny_mnist,
    read_jsonl,
    read_jsonl_tolerant,
    read_status,
    run_here,
    start_cli,
    tree_hashes,
    wait_for_step,
)

from mnist_dist.claim import STALE_SECONDS, Holder
from mnist_dist.errors import EXIT_STOPPED, EXIT_USAGE
from mnist_dist.layout import RunLayout

STEPS_PER_EPOCH = 16  # 512 images, batch 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("data"), n_train=512)


def args(data: Path, *extra: str) -> list[str]:
    return [
        "train", "--data-dir", str(data), "--epochs", "2", "--batch-size", "32",
        "--log-every", "1", *extra,
    ]  # fmt: skip


def continue_command(stderr: str) -> str:
    [line] = [x for x in stderr.splitlines() if x.startswith("mnist-dist: stopped:")]
    return line.split("; to continue: ", 1)[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("second_lr", ["0.001", "0.01"], ids=["same flags", "another lr"])
def test_two_trainings_in_one_directory_one_trains_and_the_other_is_refused(
    second_lr, data, tmp_path
):
    out = tmp_path / "run"
    slow = fault_env(STEP_SLEEP=0.2)  # 6 s of training: the second start finds the first
    runs = []
    for name, lr in (("first", "0.001"), ("second", second_lr)):
        command = args(data, "--output-dir", str(out), "--lr", lr)
        started = start_cli(*command, launched=False, env=slow, workdir=tmp_path / name)
        runs.append((started, lr, time.monotonic()))
        time.sleep(0.5)
    ended = {}
    while len(ended) < 2:  # when each one exits
        for started, _, _ in runs:
            if started.proc.poll() is not None:
                ended.setdefault(started, time.monotonic())
        time.sleep(0.05)

    [(winner, lr, _)] = [r for r in runs if r[0].proc.returncode == 0]
    [(loser, _, loser_start)] = [r for r in runs if r[0].proc.returncode != 0]
    won, lost = winner.wait(), loser.wait()
    assert lost.returncode == EXIT_USAGE, lost.stderr[-3000:]
    [line] = lost.stderr.splitlines()
    assert line.startswith(f"mnist-dist: error: {out} is in use by another training (host ")
    assert f"pid {winner.proc.pid}, since " in line and "choose another --output-dir" in line
    # Refused once its imports are done (seconds; a minute on a loaded 2-core machine),
    # while the other one still trains.
    assert ended[loser] < ended[winner] and ended[loser] - loser_start < 90

    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == float(lr)
    alone = tmp_path / "alone"
    assert run_here(*args(data, "--output-dir", str(alone), "--lr", lr)).returncode == 0
    assert_bit_identical(out / "model.safetensors", alone / "model.safetensors")
    assert read_status(out)["state"] == "finished" and not RunLayout(out).claim.exists()
    assert "done:" in won.stdout


@pytest.mark.multiprocess
def test_status_and_report_while_running_and_after_sigkill_then_the_same_command_takes_over(
    data, tmp_path
):
    out = tmp_path / "run"
    command = args(data, "--output-dir", str(out), "--checkpoint-every", "4")
    started = start_cli(*command, launched=False, env=fault_env(STEP_SLEEP=0.3),
                        workdir=tmp_path / "p")  # fmt: skip
    wait_for_step(out, 1, started)
    early = read_status(out)
    assert run_here("report", str(out)).stdout.count("run: running in epoch 1") == 1
    wait_for_step(out, 9, started)  # after the checkpoint at step 8 and its heartbeat
    later = read_status(out)
    started.proc.send_signal(signal.SIGKILL)
    started.proc.wait()

    assert early["state"] == later["state"] == "running"
    assert later["heartbeat"] > early["heartbeat"]  # >= 4 steps of 0.3 s apart
    assert later["global_step"] > early["global_step"] and later["global_step"] % 4 == 0
    assert later["checkpoint"] == str(RunLayout(out).checkpoint(1, later["global_step"]))
    dead = run_here("report", str(out)).stdout
    assert f"run: not running (its process, pid {started.proc.pid} on " in dead
    assert f"  to continue: {shlex.join([sys.executable, '-m', 'mnist_dist', *command])}" in dead

    taken = run_here(*command)
    assert taken.returncode == 0, taken.stderr[-3000:]
    [warning] = [x for x in taken.stdout.splitlines() if x.startswith("warning:")]
    assert warning.startswith(f"warning: taking over {out} from a training that held it (host ")
    assert warning.endswith("its process is gone")
    alone = tmp_path / "alone"
    assert run_here(*args(data, "--output-dir", str(alone))).returncode == 0
    assert_bit_identical(out / "model.safetensors", alone / "model.safetensors")
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert "run: not running" not in run_here("report", str(out)).stdout


def write_claim(run_dir: Path, host: str, job: str, seconds_ago: float) -> Holder:
    """A claim (and its status.json heartbeat) left by a training on another host."""
    then = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    stamp = then.isoformat(timespec="seconds")
    holder = Holder(host, 4321, job, 0, stamp, "f" * 32)
    run_dir.mkdir(parents=True, exist_ok=True)
    RunLayout(run_dir).claim.write_text(json.dumps(asdict(holder)))
    beat = {"state": "running", "epoch": 1, "step": 3, "heartbeat": stamp, "claim": holder.token}
    RunLayout(run_dir).status.write_text(json.dumps(beat))
    return holder


def test_requeue_takes_its_own_job_over_and_another_live_job_is_refused(data, tmp_path):
    out = tmp_path / "run"
    requeued = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}

    write_claim(out, "node-b", "4242", seconds_ago=5)  # the attempt before, on another node
    result = run_here(*args(data, "--output-dir", str(out)), env=requeued)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"warning: taking over {out} from a training that held it (host node-b, pid 4321, "
        "SLURM job 4242, since "
    ) in result.stdout
    assert "an earlier attempt of SLURM job 4242 (requeued)" in result.stdout
    assert read_status(out)["state"] == "finished" and not RunLayout(out).claim.exists()

    other = tmp_path / "other"
    holder = write_claim(other, "node-c", "999", seconds_ago=5)  # another job, alive
    before = tree_hashes(other)
    refused = run_here(*args(data, "--output-dir", str(other)), env=requeued)
    assert refused.returncode == EXIT_USAGE
    assert refused.stderr.splitlines() == [
        f"mnist-dist: error: {other} is in use by another training (host node-c, pid 4321, "
        f"SLURM job 999, since {holder.since}; last sign of life {holder.since}): wait for it, "
        f"stop it (touch {other / 'STOP'}), or choose another --output-dir"
    ]
    assert tree_hashes(other) == before  # nothing written, nothing deleted
    doctor = run_here("doctor", "--data-dir", str(data), "--output-dir", str(other))
    assert doctor.returncode == EXIT_USAGE and f"{other} is in use by another" in doctor.stderr

    write_claim(other, "node-c", "999", seconds_ago=STALE_SECONDS + 60)  # silent too long
    stale = run_here(*args(data, "--output-dir", str(other)))
    assert stale.returncode == 0, stale.stderr[-3000:]
    assert re.search(r"warning: taking over .* no sign of life for 1[01] min", stale.stdout)


@pytest.mark.multiprocess
@pytest.mark.parametrize("launched", [False, True], ids=["1proc", "2proc"])
def test_a_run_without_output_dir_stopped_by_ctrl_c_continues_with_the_printed_command(
    launched, data, tmp_path
):
    words = args(data)
    first = [sys.executable, "-m", "mnist_dist", *words]
    cmd = launch_command(*words) if launched else first
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, cwd=tmp_path, env=_env(fault_env(STEP_SLEEP=0.1))
        )
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/steps.jsonl")) or not any(
        r["global_step"] >= STEPS_PER_EPOCH + 3
        for r in read_jsonl_tolerant(next(runs.glob("*/steps.jsonl")))
    ):
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "err.txt"
        ).read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C (to the launcher, under accelerate launch)
    proc.wait(timeout=120)
    [run_dir] = runs.iterdir()
    assert read_status(run_dir)["state"] == "stopped"
    if not launched:
        assert proc.returncode == EXIT_STOPPED
    printed = continue_command((tmp_path / "err.txt").read_text())
    assert f"--output-dir runs/{run_dir.name}" in printed
    assert read_status(run_dir)["continue"] == printed
    report = run_here("report", str(run_dir), cwd=tmp_path).stdout
    assert f"  to continue: {printed}" in report

    again = subprocess.run(
        shlex.split(printed), capture_output=True, text=True, cwd=tmp_path, env=_env(None)
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from runs/{run_dir.name}/checkpoints/epoch-002-step-0000" in again.stdout
    assert [p.name for p in runs.iterdir()] == [run_dir.name]  # the same run, no new one
    assert read_status(run_dir)["state"] == "finished"
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_a_refused_start_leaves_no_run_directory(data, tmp_path):
    missing = tmp_path / "a" / "checkpoints" / "epoch-001-step-000000"
    for extra in (("--output-dir", str(tmp_path / "new" / "run")), ()):
        result = run_here(*args(data, "--resume", str(missing), *extra))
        assert result.returncode == EXIT_USAGE
        assert result.stderr.splitlines() == [
            f"mnist-dist: error: checkpoint {missing} does not exist"
        ]
    assert sorted(os.listdir(tmp_path)) == []


def test_the_take_over_rules(tmp_path):
    from mnist_dist import claim

    me, run = Holder.this_process(), RunLayout(tmp_path)
    now = me.since

    def holder(**changes) -> Holder:
        fields = {**asdict(me), "pid": os.getpid(), "token": "t" * 32, "since": now, **changes}
        return Holder(**fields)

    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert claim.judge(run, holder(pid=int(dead_pid)), me) == "its process is gone"
    assert claim.judge(run, holder(), me) is None  # this host, alive: held
    assert claim.judge(run, holder(host="node-b"), me) is None  # another host, recent
    requeued = Holder(**{**asdict(me), "slurm_job": "7", "restart": 2})
    earlier = holder(slurm_job="7", restart=1)  # same host and a live pid, still the job's past
    assert claim.judge(run, earlier, requeued) == "an earlier attempt of SLURM job 7 (requeued)"
    assert claim.judge(run, holder(slurm_job="7", restart=2), requeued) is None
    old = (datetime.now(timezone.utc) - timedelta(seconds=STALE_SECONDS + 1)).isoformat()
    assert "no sign of life" in claim.judge(run, holder(host="node-b", since=old), me)


def test_a_fresh_claim_moved_by_a_late_taker_is_put_back(tmp_path):
    from mnist_dist import claim

    stale = write_claim(tmp_path, "node-b", "1", seconds_ago=STALE_SECONDS + 60)
    first, late = Holder.this_process(), Holder.this_process()
    assert claim.acquire(RunLayout(tmp_path), first).startswith("warning: taking over")
    # The late one judged the stale claim too, before the first one replaced it.
    assert not claim._take_over(RunLayout(tmp_path), stale, late)
    assert claim.read_holder(RunLayout(tmp_path)) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim.json", "status.json"]


def test_a_run_whose_claim_was_taken_over_stops_at_its_next_heartbeat(tmp_path):
    from mnist_dist.claim import ClaimLost, acquire
    from mnist_dist.rundir import RunDir

    me = Holder.this_process()
    acquire(RunLayout(tmp_path), me)
    run_dir = RunDir(RunLayout(tmp_path), True, me, "mnist-dist train --output-dir x")
    run_dir.beat(1, 3, 3, None, force=True)
    assert read_status(tmp_path)["claim"] == me.token and read_status(tmp_path)["step"] == 3
    write_claim(tmp_path, "node-b", "2", seconds_ago=0)  # another training took it over
    before = tree_hashes(tmp_path)
    with pytest.raises(ClaimLost, match="was taken over by another training \\(host node-b"):
        run_dir.beat(1, 9, 9, None, force=True)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize(
    "argv, resume_setting, env, expected",
    [
        (["train", "--output-dir=old", "--lr", "0.01"], "auto", {},
         ["train", "--output-dir", "runs/r", "--lr", "0.01"]),
        (["train", "--resume", "never", "--data-dir", "my data"], "never", {},
         ["train", "--resume", "auto", "--data-dir", "my data", "--output-dir", "runs/r"]),
        (["train", "--output-dir", "runs/slurm-7", "--resume", "auto", "--epochs", "3"], "auto",
         {"SLURM_JOB_ID": "7", "MNIST_DIST_RUN_DIR": "runs/slurm-7"},
         ["sbatch", "slurm/train.sbatch", "--output-dir", "runs/r", "--resume", "auto",
          "--epochs", "3"]),
        (["train", "--resume", "runs/r/checkpoints/epoch-002-step-000000"],
         "runs/r/checkpoints/epoch-002-step-000000", {},
         ["train", "--resume", "auto", "--output-dir", "runs/r"]),
        (["train", "--resume", "runs/a/checkpoints/epoch-002-step-000000"],
         "runs/a/checkpoints/epoch-002-step-000000", {},
         ["train", "--resume", "runs/a/checkpoints/epoch-002-step-000000", "--output-dir",
          "runs/r"]),
    ],
    ids=["output-dir replaced", "resume never", "in a job of train.sbatch", "own checkpoint",
         "branch"],
)  # fmt: skip
def test_the_continue_command_is_the_command_run_with_the_runs_directory(
    argv, resume_setting, env, expected, monkeypatch
):
    from mnist_dist import resume

    monkeypatch.setattr(sys, "argv", [str(Path(resume.__file__).parent / "__main__.py"), *argv])
    for name in ("SLURM_JOB_ID", "MNIST_DIST_RUN_DIR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # This process was not started as mnist-dist: its own argv does not end with ``argv``.
    command = shlex.split(resume.continue_command(Path("runs/r"), resume_setting))
    if not env:
        assert command[:3] == [sys.executable, "-m", "mnist_dist"]
        command = command[3:]
    assert command == expected


@pytest.mark.multiprocess
def test_every_rank_of_a_launch_refuses_a_held_directory(data, tmp_path):
    out = tmp_path / "run"
    write_claim(out, "node-c", "999", seconds_ago=5)
    before = tree_hashes(out)
    result = launch_cli(*args(data, "--output-dir", str(out)), timeout=300)
    assert result.returncode != 0
    refusal = f"mnist-dist: error: {out} is in use by another training (host node-c"
    assert [line[: len(refusal)] for line in result.error_lines()] == [refusal]  # once a node
    # The launcher's summary has each rank's own line: both ranks refused, none hung.
    ranks = [line for line in result.stderr.splitlines() if f"traceback : {refusal}" in line]
    assert len(ranks) == 2, result.stderr[-3000:]
    assert tree_hashes(out) == before
