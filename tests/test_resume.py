"""Checkpoints, exact resume and preemption: real runs that are stopped, killed and resumed.

Runs use a tiny dataset (512 training images, batch 32: 16 steps per epoch, 2 epochs) so a test
takes seconds; faults come from ``tests/faults/sitecustomize.py`` in the started processes.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from helpers import (
    assert_bit_identical,
    fault_env,
    launch_cli,
    make_tiny_mnist,
    read_jsonl,
    read_status,
    read_summary,
    run_cli,
    run_here,
    start_cli,
    tree_hashes,
    wait_for_step,
)
from safetensors.torch import load_file

from mnist_dist.errors import EXIT_DIVERGED, EXIT_STOPPED, EXIT_USAGE, EXIT_WRITE_FAILED
from mnist_dist.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    STATUS_FILE,
    STEPS_FILE,
    STOP_FILE,
    SUMMARY_FILE,
)

STEPS_PER_EPOCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("data"), n_train=512)


def train_args(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", str(epochs),
        "--batch-size", "32", "--log-every", "1", *extra,
    ]  # fmt: skip


def train(data: Path, out: Path, *extra: str, launched: bool = False, env=None, epochs=2):
    # The faults (the only ``env`` given) are injected at a child's start: those runs are
    # children; the others run in this process.
    run = launch_cli if launched else run_cli if env else run_here
    return run(*train_args(data, out, *extra, epochs=epochs), env=env)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, Path]:
    """Final weights of uninterrupted runs, 1 process and 2 processes."""
    out = {}
    for name, launched in (("1proc", False), ("2proc", True)):
        run_dir = tmp_path_factory.mktemp(f"uninterrupted-{name}") / "run"
        result = train(data, run_dir, launched=launched)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = run_dir / MODEL_FILE
    return out


def weights(path: Path) -> dict:
    return load_file(str(path))


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir())


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "launcher, how",
    [("1proc", "SIGTERM"), ("2proc", "SIGTERM"), ("1proc", "SIGUSR1"), ("2proc", "stop file")],
)
def test_stop_mid_epoch_then_resume_gives_bit_identical_weights(
    launcher, how, data, uninterrupted, tmp_path
):
    launched = launcher == "2proc"
    out = tmp_path / "run"
    # A slow step (50 ms) leaves time to stop the run in the middle of epoch 2.
    started = start_cli(
        *train_args(data, out), launched=launched, env=fault_env(STEP_SLEEP=0.05),
        workdir=tmp_path / "first",
    )  # fmt: skip
    wait_for_step(out, STEPS_PER_EPOCH + 4, started)
    if how == "stop file":
        (out / STOP_FILE).write_text("")
    else:  # to the launcher itself under accelerate launch, as a scheduler would
        started.proc.send_signal(getattr(signal, how))
    stopped = started.wait(timeout=120)

    assert read_status(out)["state"] == "stopped", stopped.stderr[-3000:]
    if not launched:  # the launcher reports any non-zero worker exit as its own failure
        assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    [line] = [x for x in stopped.stderr.splitlines() if x.startswith("mnist-dist: stopped:")]
    assert {"SIGTERM": "signal SIGTERM", "SIGUSR1": "signal SIGUSR1"}.get(how, how) in line
    newest = out / CHECKPOINTS_DIR / checkpoints(out)[-1]
    state = trainer_state(newest)
    assert state["epoch"] == 2 and 0 < state["step"] < STEPS_PER_EPOCH  # mid-epoch
    assert state["global_step"] == STEPS_PER_EPOCH + state["step"]
    assert state["world_size"] == (2 if launched else 1)
    assert not (out / STOP_FILE).exists()  # consumed: the resumed run must not stop at once

    resumed = train(data, out, launched=launched)  # the same command: --resume auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {newest}: epoch 2, step {state['step']}" in resumed.stdout
    assert_bit_identical(out / MODEL_FILE, uninterrupted[launcher])
    summary = read_summary(out)
    assert (summary["epochs_completed"], summary["global_step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert summary["world_size"] == (2 if launched else 1)
    assert [r["epoch"] for r in read_jsonl(out / METRICS_FILE)] == [1, 2]
    steps = [r["global_step"] for r in read_jsonl(out / STEPS_FILE)]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # no step twice, none missing
    assert read_status(out)["state"] == "finished"


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(
    data, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    # Killed in the 3rd save (after global step 15), its files written but not its manifest.
    killed = train(data, out, "--checkpoint-every", "5", env=fault_env(KILL_IN_SAVE=3))
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(out) == [
        ".partial-epoch-001-step-000015",  # the write that was killed: never used
        "epoch-001-step-000005",
        "epoch-001-step-000010",
    ]

    resumed = train(data, out, "--checkpoint-every", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epoch-001-step-000010" in resumed.stdout
    assert_bit_identical(out / MODEL_FILE, uninterrupted["1proc"])
    assert not [name for name in checkpoints(out) if name.startswith(".partial")]


@pytest.mark.multiprocess
@pytest.mark.parametrize("first, then", [("2proc", "1proc"), ("1proc", "2proc")])
def test_epoch_checkpoint_resumes_on_another_world_size(first, then, data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    one_epoch = train(data, out, launched=first == "2proc", epochs=1)
    assert one_epoch.returncode == 0, one_epoch.stderr[-3000:]
    assert checkpoints(out) == ["epoch-002-step-000000"]

    resumed = train(data, out, launched=then == "2proc", epochs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "not bit for bit" in resumed.stdout
    summary = read_summary(out)
    assert summary["world_size"] == (2 if then == "2proc" else 1)
    assert summary["epochs_completed"] == 2
    # Within noise of the uninterrupted run: the same math, a different summation order. Adam
    # turns rounding noise in a near-zero gradient into a step of up to lr (1e-3), so the noise
    # floor is measured: what separates the uninterrupted 1- and 2-process runs themselves.
    reference, other = weights(uninterrupted[then]), weights(uninterrupted[first])
    noise = max((reference[key] - other[key]).abs().max().item() for key in reference)
    for key, tensor in weights(out / MODEL_FILE).items():
        assert (tensor - reference[key]).abs().max() <= max(2 * noise, 1e-4), (key, noise)
    reference_summary = read_summary(uninterrupted[then].parent)
    assert abs(summary["test_accuracy"] - reference_summary["test_accuracy"]) <= 2 / 128


def test_keep_checkpoints_keeps_exactly_the_newest_complete_ones(data, tmp_path, train_here):
    out = tmp_path / "run"
    # In this process: it reads only the files the run writes.
    train_here(*train_args(data, out, "--checkpoint-every", "3", "--keep-checkpoints", "2")[1:])
    assert checkpoints(out) == ["epoch-002-step-000014", "epoch-003-step-000000"]
    for name in checkpoints(out):
        assert (out / CHECKPOINTS_DIR / name / MANIFEST_FILE).exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_newest(data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    # Training forward pass 23 (epoch 2, step 7) returns NaN; checkpoints every 5 steps.
    diverged = train(data, out, "--checkpoint-every", "5", env=fault_env(NAN_AT_STEP=23))
    assert diverged.returncode == EXIT_DIVERGED, diverged.stderr[-3000:]
    [line] = diverged.error_lines()
    assert "non-finite training loss at epoch 2, step 7 (global step 23)" in line
    assert "epoch-002-step-000004" in line  # global step 20: the last good state
    assert checkpoints(out)[-1] == "epoch-002-step-000004"
    assert read_status(out)["state"] == "diverged"

    resumed = train(data, out, "--checkpoint-every", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 2, step 4" in resumed.stdout
    assert_bit_identical(out / MODEL_FILE, uninterrupted["1proc"])


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(data, tmp_path):
    out = tmp_path / "run"
    assert train(data, out, "--checkpoint-every", "5", epochs=1).returncode == 0
    newest = out / CHECKPOINTS_DIR / "epoch-002-step-000000"
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # truncated

    explicit = train(data, tmp_path / "other", "--resume", str(newest))
    assert explicit.returncode == EXIT_USAGE
    [line] = explicit.error_lines()
    assert f"checkpoint file {optimizer} is truncated or damaged" in line

    resumed = train(data, out, epochs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: checkpoint file {optimizer} is truncated" in resumed.stdout
    assert "resumed from" in resumed.stdout and "epoch-001-step-000015" in resumed.stdout
    assert read_summary(out)["epochs_completed"] == 2


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p.mkdir(), "is incomplete or not an mnist-dist checkpoint"),
        (lambda p: p.write_bytes(b"\0" * 64), "is not a checkpoint folder"),
        (lambda p: None, "does not exist"),
    ],
)
def test_foreign_resume_path_is_one_line(make, fragment, data, tmp_path):
    path = tmp_path / "not-a-checkpoint"
    make(path)
    result = train(data, tmp_path / "run", "--resume", str(path))
    assert result.returncode == EXIT_USAGE
    [line] = result.error_lines()
    assert str(path) in line and fragment in line
    assert len(result.stderr.strip().splitlines()) == 1


def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_state(data, tmp_path):
    out = tmp_path / "run"
    # The 2nd save (global step 10) fails as on a full disk.
    failed = train(data, out, "--checkpoint-every", "5", env=fault_env(ENOSPC_IN_SAVE=2))
    assert failed.returncode == EXIT_WRITE_FAILED, failed.stderr[-3000:]
    [line] = failed.error_lines()
    assert "cannot write checkpoint" in line and "No space left on device" in line
    assert len(failed.stderr.strip().splitlines()) == 1
    assert [n for n in checkpoints(out) if not n.startswith(".")] == ["epoch-001-step-000005"]

    resumed = train(data, out, "--checkpoint-every", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 5" in resumed.stdout


def test_unwritable_checkpoint_folder_is_one_line(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINTS_DIR).write_text("")  # not a folder: nothing can be written under it
    result = train(data, out)
    assert result.returncode == EXIT_WRITE_FAILED
    [line] = result.error_lines()
    assert f"cannot write checkpoint {out / 'checkpoints'}" in line


def test_resume_never_refuses_a_directory_holding_a_run(data, tmp_path):
    out = tmp_path / "run"
    assert train(data, out, epochs=1).returncode == 0
    before = (out / METRICS_FILE).read_text()
    result = train(data, out, "--resume", "never")
    assert result.returncode == EXIT_USAGE
    [line] = result.error_lines()
    # Its checkpoints are intact: the line says why it refuses, not that there are none.
    assert f"{out} already holds a run; --resume never starts a new one" in line
    assert "no intact checkpoint" not in line
    assert (out / METRICS_FILE).read_text() == before


def test_mid_epoch_checkpoint_refuses_another_batch_size(data, tmp_path):
    out = tmp_path / "run"
    assert train(data, out, "--checkpoint-every", "5", epochs=1).returncode == 0
    mid = out / CHECKPOINTS_DIR / "epoch-001-step-000015"
    result = run_here(
        "train", "--data-dir", str(data), "--output-dir", str(tmp_path / "b"),
        "--batch-size", "64", "--resume", str(mid),
    )  # fmt: skip
    assert result.returncode == EXIT_USAGE
    assert "taken mid-epoch with global_batch_size 32" in result.error_lines()[0]


@pytest.fixture
def small_disk(tmp_path, request):
    """A real small file system (tmpfs), 700 KiB unless the test says otherwise: room for one
    checkpoint (about 410 KB), not two."""
    import subprocess

    size = getattr(request, "param", "700k")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_the_previous_checkpoint_resumes(data, small_disk, tmp_path):
    out = small_disk / "run"
    failed = train(data, out, "--checkpoint-every", "5", epochs=1)
    assert failed.returncode == EXIT_WRITE_FAILED, failed.stderr[-3000:]
    [line] = failed.error_lines()
    assert "cannot write checkpoint" in line and "No space left on device" in line
    first = out / CHECKPOINTS_DIR / "epoch-001-step-000005"
    assert (first / MANIFEST_FILE).exists()

    resumed = train(data, tmp_path / "elsewhere", "--resume", str(first), epochs=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 5" in resumed.stdout


def test_evaluate_reads_a_checkpoint_folder_and_names_a_truncated_one(data, tmp_path):
    out = tmp_path / "run"
    assert train(data, out, epochs=1).returncode == 0
    folder = out / CHECKPOINTS_DIR / "epoch-002-step-000000"
    ok = run_here("evaluate", "--weights", str(folder), "--data-dir", str(data), "--json")
    assert ok.returncode == 0, ok.stderr[-3000:]
    [report] = ok.json_lines()
    assert report["test_correct"] == read_summary(out)["test_correct"]

    model = folder / "model.safetensors"
    model.write_bytes(model.read_bytes()[:5000])
    bad = run_here("evaluate", "--weights", str(folder), "--data-dir", str(data))
    assert bad.returncode == EXIT_USAGE
    [line] = bad.error_lines()
    assert f"{model} is not a readable safetensors weights file" in line


@pytest.mark.parametrize("small_disk", ["480k"], indirect=True)
def test_full_disk_at_the_final_export_is_one_line(data, small_disk):
    # Room for the epoch's checkpoint (about 410 KB), not for model.safetensors after it.
    out = small_disk / "run"
    failed = train(data, out, epochs=1)
    assert failed.returncode == EXIT_WRITE_FAILED, failed.stderr[-3000:]
    [line] = failed.error_lines()
    assert f"cannot write {out / 'model.safetensors'}: No space left on device" in line
    assert len(failed.stderr.strip().splitlines()) == 1
    assert read_status(out)["state"] == "failed"
    assert (out / CHECKPOINTS_DIR / "epoch-002-step-000000" / MANIFEST_FILE).exists()


def provenance(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / CONFIG_FILE).read_text())["provenance"]


def test_a_finished_run_stays_as_it_finished_and_more_epochs_continue_it(data, tmp_path):
    out, milestone = tmp_path / "run", ("--lr-milestones", "2")
    assert train(data, out, *milestone).returncode == 0
    first, started_at = read_summary(out), provenance(out)["started_at"]
    before = tree_hashes(out)

    for epochs in (2, 1):  # the same command again, or fewer epochs: nothing to do
        again = train(data, out, *milestone, epochs=epochs)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.splitlines() == [
            f"mnist-dist: {out} holds a finished run: 2 epoch(s), test accuracy "
            f"{first['test_accuracy']:.2%}; summary in {out / 'summary.json'}; pass --epochs "
            "above 2 to train it further"
        ]
        assert again.stderr == ""
        assert tree_hashes(out) == before

    for epochs in (2, 3):  # settings that change the math: refused, whatever --epochs says
        changed = train(
            data, out, *milestone, "--lr", "0.01", "--batch-size", "64", "--no-channels-last",
            epochs=epochs,
        )  # fmt: skip
        assert changed.returncode == EXIT_USAGE
        assert changed.stderr.splitlines() == [
            f"mnist-dist: error: {out} was trained with --lr 0.001 --batch-size 32 "
            "--channels-last; this command has --lr 0.01 --batch-size 64 --no-channels-last: "
            "resume with the run's settings or choose another --output-dir"
        ]
        assert tree_hashes(out) == before

    # More epochs continue from the newest checkpoint, with settings that do not change the
    # math: the schedule goes on (a decay after epoch 2), the records are appended, and the
    # weights are an uninterrupted 3-epoch run's.
    more = train(data, out, *milestone, "--log-every", "4", "--keep-checkpoints", "1", epochs=3)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"note: {out} finished 2 epoch(s); training on to 3" in more.stdout
    uninterrupted = tmp_path / "uninterrupted"
    assert train(data, uninterrupted, *milestone, epochs=3).returncode == 0
    assert_bit_identical(out / MODEL_FILE, uninterrupted / MODEL_FILE)
    assert [r["lr"] for r in read_jsonl(out / METRICS_FILE)] == pytest.approx([1e-3, 1e-3, 1e-5])
    steps = [r["global_step"] for r in read_jsonl(out / STEPS_FILE)]
    assert steps == [*range(1, 33), 36, 40, 44, 48]
    # The run's start is the first one; its wall time adds this process's to the first's.
    summary = read_summary(out)
    assert provenance(out)["started_at"] == summary["started_at"] == started_at
    assert provenance(out)["resumed_at"] >= started_at
    assert summary["epochs_completed"] == 3
    assert (
        summary["segment_wall_seconds"] + 0.5 * first["segment_wall_seconds"]
        < summary["run_wall_seconds"]
        <= summary["segment_wall_seconds"] + first["run_wall_seconds"]
    )

    # A run killed after its last checkpoint and before its summary: fewer epochs than it has
    # trained are refused; its own count finishes it without training.
    (out / SUMMARY_FILE).unlink()
    (out / STATUS_FILE).write_text('{"state": "running"}')
    fewer = train(data, out, *milestone, epochs=2)
    assert fewer.returncode == EXIT_USAGE
    assert "has trained past --epochs 2" in fewer.stderr and "--epochs 3 or more" in fewer.stderr
    assert train(data, out, *milestone, epochs=3).returncode == 0
    assert read_summary(out)["epochs_completed"] == 3 and read_status(out)["state"] == "finished"


def test_a_branch_may_change_settings_and_records_where_it_came_from(data, tmp_path):
    first = tmp_path / "a"
    assert train(data, first, "--checkpoint-every", "8", epochs=1).returncode == 0
    origin = first / CHECKPOINTS_DIR / "epoch-002-step-000000"
    branch = tmp_path / "b"
    args = ("--resume", str(origin), "--lr", "0.01", "--lr-milestones", "2")
    # A child: started_at has whole seconds, and a run in this process can start within the
    # second the first run started in; a child's start takes longer than that.
    result = run_cli(*train_args(data, branch, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("note:")] == [
        f"note: branching from {origin}, trained with --lr 0.001 --lr-milestones 5,8; this "
        "run has --lr 0.01 --lr-milestones 2"
    ]
    # The branch trains with its own LR (the restored optimizer held the first run's).
    assert [r["lr"] for r in read_jsonl(branch / METRICS_FILE)] == pytest.approx([1e-3, 1e-2])
    assert provenance(branch)["branched_from"] == provenance(branch)["resumed_from"] == str(origin)
    assert provenance(branch)["started_at"] > provenance(first)["started_at"]  # a run of its own
    assert provenance(first)["branched_from"] is None

    # The same command again continues the branch from its own newest checkpoint.
    again = train(data, branch, *args, epochs=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {branch / 'checkpoints' / 'epoch-003-step-000000'}" in again.stdout
    assert [r["lr"] for r in read_jsonl(branch / METRICS_FILE)] == pytest.approx([1e-3, 1e-2, 1e-4])
    assert trainer_state(branch / CHECKPOINTS_DIR / "epoch-004-step-000000")["branched_from"] == (
        str(origin)
    )
    # Another checkpoint into the same folder would mix two runs' records.
    mixed = train(data, branch, "--resume", str(first / CHECKPOINTS_DIR / "epoch-001-step-000008"))
    assert mixed.returncode == EXIT_USAGE
    assert f"{branch} already holds a run; continue it with --resume auto" in mixed.stderr
