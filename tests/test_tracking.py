"""What a run shows: the rich console on a terminal, plain lines elsewhere, and W&B.

The W&B tests run the real ``wandb`` library offline and read back the ``run-*.wandb`` file it
wrote (``wandb_file.py``). Faults are injected into the child process only, through
``faults/sitecustomize.py`` on its PYTHONPATH.
"""

import base64
import dataclasses
import hashlib
import json
import signal
import socket
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    fault_env,
    launch_cli,
    read_jsonl,
    read_summary,
    run_cli,
    run_cli_in_terminal,
    start_cli,
    wait_for_step,
)
from wandb_file import read_run

from mnist_dist.config import TrackingConfig
from mnist_dist.console import format_epoch_line
from mnist_dist.errors import EXIT_STOPPED
from mnist_dist.layout import METRICS_FILE, MODEL_FILE, STEPS_FILE, WANDB_RUN_ID_FILE
from mnist_dist.wandb_tracker import wandb_mode, wants_wandb

WARNING = "warning: W&B"


def test_a_terminal_gets_a_progress_bar_and_an_epoch_table(tiny_mnist, tmp_path):
    code, screen = run_cli_in_terminal(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "r"),
        "--epochs", "2", "--batch-size", "32", "--log-every", "2",
    )  # fmt: skip
    assert code == 0, screen[-2000:]
    assert "\x1b[" in screen  # redrawn with terminal control sequences
    for header in ("epoch", "train loss", "test acc", "images/s"):
        assert header in screen
    assert "img/s" in screen and "/8" in screen  # the progress bar: steps done of 8
    assert "epoch 1/2  lr" not in screen  # no plain log lines on a terminal


def test_plain_epoch_line_has_every_figure():
    record = {
        "epoch": 3, "lr": 1e-5, "train_loss": 0.1234, "train_accuracy": 0.9876,
        "test_loss": 0.0456, "test_accuracy": 0.9912, "test_correct": 9912, "test_total": 10000,
        "epoch_seconds": 12.34, "images_per_second": 5678.9,
    }  # fmt: skip
    assert format_epoch_line(record, 10) == (
        "epoch 3/10  lr 1.0e-05  train_loss 0.1234  train_acc 98.76%  test_loss 0.0456  "
        "test_acc 99.12% (9912/10000)  12.3s  5,679 images/s"
    )


def wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No credentials anywhere (an empty .netrc), so the default is an offline run."""
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    return {"NETRC": str(netrc), **extra}


def train_tracked(run, data_dir: Path, out: Path, *args: str, env: dict[str, str]):
    return run(
        "train", "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", "--log-every", "2", "--tracker", "wandb", *args, env=env,
    )  # fmt: skip


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def run_file(out: Path):
    (run_dir,) = offline_runs(out)
    (path,) = run_dir.glob("run-*.wandb")
    return run_dir, read_run(path)


def table(run_dir: Path, history_row: dict, key: str) -> dict:
    """A logged wandb.Table, read from the JSON file the history row points to."""
    return json.loads((run_dir / "files" / history_row[f"{key}/path"]).read_text())


def warnings(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if WARNING in line]


def assert_local_records_complete(out: Path, epochs: int = 2) -> None:
    metrics = read_jsonl(out / METRICS_FILE)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    summary = read_summary(out)
    assert summary["epochs_completed"] == epochs
    assert summary["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert (out / MODEL_FILE).stat().st_size > 0


def test_offline_run_holds_config_metrics_confusion_misclassified_and_model(tiny_mnist, tmp_path):
    out = tmp_path / "r"
    result = train_tracked(run_cli, tiny_mnist, out, env=wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings(result) == []

    run_dir, run = run_file(out)
    # One run, its id kept in the run directory, and the exact command that uploads it.
    assert run.run_id == (out / WANDB_RUN_ID_FILE).read_text().strip()
    assert f"upload it with: wandb sync {run_dir}" in result.stdout
    assert run.project == "mnist-dist" and run.exit_code == 0

    # The resolved config with provenance.
    assert run.config["optim"]["lr"] == 1e-3 and run.config["train"]["epochs"] == 2
    assert run.config["tracking"]["tracker"] == "wandb"
    provenance = run.config["provenance"]
    assert provenance["world_size"] == 1 and provenance["mixed_precision"] == "no"
    assert provenance["versions"]["wandb"] and provenance["versions"]["torch"]
    assert "git_commit" in provenance and "slurm_job_id" in provenance and provenance["devices"]

    # Per-epoch figures equal metrics.jsonl; per-step ones equal steps.jsonl.
    metrics = read_jsonl(out / METRICS_FILE)
    epochs = run.rows_with("epoch/test_accuracy")
    assert [r["epoch/test_accuracy"] for r in epochs] == [m["test_accuracy"] for m in metrics]
    assert [r["epoch/train_loss"] for r in epochs] == [m["train_loss"] for m in metrics]
    assert [r["global_step"] for r in epochs] == [m["global_step"] for m in metrics]
    assert all("epoch/seconds" in r and "epoch/train_accuracy" in r for r in epochs)
    steps = read_jsonl(out / STEPS_FILE)
    logged_steps = run.rows_with("train/loss")
    assert [r["train/loss"] for r in logged_steps] == [s["train_loss"] for s in steps]
    assert [r["global_step"] for r in logged_steps] == [s["global_step"] for s in steps]
    assert all("train/lr" in r and "train/images_per_second" in r for r in logged_steps)
    # Every metric is plotted against our own global step, which never goes back.
    assert any(m.glob_name == "*" and m.step_metric == "global_step" for m in run.metrics)
    axis = [r["global_step"] for r in run.history if "global_step" in r and "_step" in r]
    assert axis == sorted(axis) and axis[-1] == read_summary(out)["global_step"]

    # At the end: summary, confusion matrix, misclassified images, model artifact.
    summary = read_summary(out)
    assert run.summary["final/test_accuracy"] == summary["test_accuracy"]
    assert run.summary["final/best_test_accuracy"] == summary["best_test_accuracy"]
    (final,) = run.rows_with("test/misclassified/path")
    confusion = table(run_dir, final, "test/confusion_matrix_table")
    counts = {(row[0], row[1]): row[2] for row in confusion["data"]}
    assert sum(counts.values()) == summary["test_total"]
    assert sum(n for (true, pred), n in counts.items() if true == pred) == summary["test_correct"]
    wrong = table(run_dir, final, "test/misclassified")
    assert wrong["columns"] == ["index", "image", "true", "predicted", "p_predicted", "p_true"]
    assert len(wrong["data"]) == min(100, summary["test_total"] - summary["test_correct"]) > 0
    for _, image, true, predicted, p_predicted, p_true in wrong["data"]:
        assert image == "Image" and true != predicted and 0 <= p_true <= p_predicted <= 1
    assert [row[0] for row in wrong["data"]] == sorted({row[0] for row in wrong["data"]})
    (images,) = [a for a in run.artifacts if "testmisclassified" in a.name]
    pngs = [e.path for e in images.manifest.contents if e.path.endswith(".png")]
    assert len(pngs) == len(wrong["data"])  # one 28x28 image per row
    (model,) = [a for a in run.artifacts if a.type == "model"]
    (entry,) = model.manifest.contents
    weights = (out / MODEL_FILE).read_bytes()
    assert entry.path == MODEL_FILE
    assert entry.digest == base64.b64encode(hashlib.md5(weights).digest()).decode()


@pytest.mark.multiprocess
def test_two_processes_make_exactly_one_wandb_run(tiny_mnist, tmp_path):
    out, imports = tmp_path / "r", tmp_path / "wandb-imports"
    env = wandb_env(tmp_path, **fault_env(RECORD_WANDB_IMPORT=str(imports)))
    result = train_tracked(launch_cli, tiny_mnist, out, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings(result) == []
    assert len(list((out / "wandb").glob("*run-*"))) == 1
    # Only one process (the main rank) ever imported wandb; the launcher and rank 1 did not.
    records = [p.read_text() for p in tmp_path.glob("wandb-imports.*")]
    assert len(records) >= 3 and sum(bool(r) for r in records) == 1
    run_dir, run = run_file(out)
    assert run.config["provenance"]["world_size"] == 2
    metrics = read_jsonl(out / METRICS_FILE)
    epochs = run.rows_with("epoch/test_accuracy")
    assert [r["epoch/test_accuracy"] for r in epochs] == [m["test_accuracy"] for m in metrics]
    # Misclassified images gathered from both ranks, in test-set order, each once.
    summary = read_summary(out)
    wrong = table(run_dir, run.rows_with("test/misclassified/path")[0], "test/misclassified")
    indices = [row[0] for row in wrong["data"]]
    assert indices == sorted(set(indices))
    assert len(indices) == min(100, summary["test_total"] - summary["test_correct"])
    assert max(indices) >= summary["test_total"] // 2  # the second rank's shard is there


@pytest.mark.parametrize(
    "setting", [{"WANDB_MODE": "disabled"}, {"WANDB_MODE": "offline", "TRACKER": "none"}]
)
def test_disabled_tracking_makes_no_wandb_calls(setting, tiny_mnist, tmp_path):
    out, imports = tmp_path / "r", tmp_path / "wandb-imports"
    tracker = setting.get("TRACKER", "wandb")
    env = wandb_env(
        tmp_path, WANDB_MODE=setting["WANDB_MODE"], **fault_env(RECORD_WANDB_IMPORT=str(imports)),
    )  # fmt: skip
    result = run_cli(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "1",
        "--batch-size", "32", "--tracker", tracker, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = tmp_path.glob("wandb-imports.*")
    assert record.read_text() == ""  # wandb was never even imported
    assert not (out / "wandb").exists() and not (out / WANDB_RUN_ID_FILE).exists()
    assert "W&B" not in result.stdout + result.stderr


def _unwritable_dir(tmp_path: Path) -> str:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return str(blocker / "wandb-dir")  # a folder below a regular file: even root cannot


@pytest.mark.parametrize("fault", ["invalid-mode", "unwritable-dir", "log-raises", "finish-hangs"])
def test_wandb_failures_never_stop_training(fault, tiny_mnist, tmp_path):
    out = tmp_path / "r"
    args: tuple[str, ...] = ()
    extra = {
        "invalid-mode": {"WANDB_MODE": "sideways"},
        "unwritable-dir": {"WANDB_DIR": _unwritable_dir(tmp_path)},
        # Dies at the 5th log call, mid-run: after four step records.
        "log-raises": fault_env(WANDB_LOG_RAISES_AFTER=4),
        "finish-hangs": fault_env(WANDB_FINISH_SLEEPS=600),
    }[fault]
    if fault == "finish-hangs":
        args = ("--wandb-finish-timeout", "1")
    result = train_tracked(run_cli, tiny_mnist, out, *args, env=wandb_env(tmp_path, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_local_records_complete(out)
    (warning,) = warnings(result)
    assert warning.startswith("warning: W&B")
    if fault in ("invalid-mode", "unwritable-dir"):
        assert "tracking stopped" in warning
        assert offline_runs(out) == [] and not (out / WANDB_RUN_ID_FILE).exists()
        assert ("sideways" if fault == "invalid-mode" else "wandb-dir") in warning
    elif fault == "log-raises":
        assert "tracking stopped (OSError: [Errno 28] No space left on device)" in warning
        run_dir, run = run_file(out)
        assert len(run.rows_with("train/loss")) == 4 and run.rows_with("epoch/epoch") == []
        assert "wandb sync" not in result.stdout  # no claim that the run is complete
    else:
        assert "did not finish within 1s" in warning
        run_dir, run = run_file(out)
        assert f"`wandb sync {run_dir}`" in warning


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


FAKE_KEY = "local-" + "0123456789abcdef" * 2 + "fakekey1"


def test_unreachable_server_falls_back_offline_and_the_key_is_written_nowhere(tiny_mnist, tmp_path):
    out = tmp_path / "r"
    env = wandb_env(
        tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}",
        WANDB_INIT_TIMEOUT="2",
    )  # fmt: skip
    result = train_tracked(run_cli, tiny_mnist, out, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_local_records_complete(out)
    (warning,) = warnings(result)
    assert "could not start online" in warning and "recording offline" in warning
    run_dir, run = run_file(out)
    assert len(run.rows_with("epoch/test_accuracy")) == 2
    assert f"wandb sync {run_dir}" in result.stdout
    # The key appears in no file mnist-dist or W&B wrote, nor on the console.
    assert FAKE_KEY not in result.stdout + result.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 10 and run_dir / f"run-{run.run_id}.wandb" in written
    for path in written:
        assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_flags_beat_wandb_env_and_a_requeued_job_continues_its_run(tiny_mnist, tmp_path):
    # One run checks both (each costs a training run): settings precedence, and that a job
    # requeued into the same run directory continues the W&B run its first attempt started.
    out = tmp_path / "r"
    out.mkdir()
    (out / WANDB_RUN_ID_FILE).write_text("requeued1\n")  # left by the job's first attempt
    env = wandb_env(
        tmp_path, WANDB_MODE="online", WANDB_PROJECT="from-env", WANDB_RUN_GROUP="env-group",
        WANDB_TAGS="env-tag",
    )  # fmt: skip
    result = train_tracked(
        run_cli, tiny_mnist, out, "--wandb-mode", "offline", "--wandb-group", "flag-group",
        "--run-name", "flag-name", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings(result) == []
    run_dir, run = run_file(out)  # offline: the flag beat WANDB_MODE=online
    assert run.project == "from-env"  # env over the default
    assert run.config["tracking"]["wandb_group"] == "flag-group"  # flag over env
    assert run.config["tracking"]["wandb_tags"] == ["env-tag"]
    assert run.config["tracking"]["run_name"] == "flag-name"
    assert run.run_id == "requeued1" and run_dir.name.endswith("-requeued1")


# Variables a job template may export empty; wandb itself rejects an empty value of most of them.
EMPTY_WANDB_ENV = (
    "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP",
    "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT",
    "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_RESUME",
)  # fmt: skip


@pytest.mark.parametrize(
    "env, flags",
    [
        ({name: "" for name in EMPTY_WANDB_ENV}, ("--wandb-mode", "offline")),
        ({name: "" for name in EMPTY_WANDB_ENV}, ()),  # offline: no credentials
        ({"WANDB_MODE": "sideways"}, ("--wandb-mode", "offline")),  # the flag wins
    ],
    ids=["empty-with-flag", "empty-without-flag", "invalid-env-with-flag"],
)
def test_empty_or_overridden_wandb_variables_still_record_an_offline_run(
    env, flags, tiny_mnist, tmp_path
):
    out = tmp_path / "r"
    result = train_tracked(run_cli, tiny_mnist, out, *flags, env=wandb_env(tmp_path, **env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings(result) == []
    run_dir, run = run_file(out)  # in the run directory: an empty WANDB_DIR is unset
    assert run.project == "mnist-dist" and run.exit_code == 0
    assert run.run_id == (out / WANDB_RUN_ID_FILE).read_text().strip()
    assert run.config["tracking"]["wandb_tags"] == [] and run.config["tracking"]["run_name"] is None
    epochs = run.rows_with("epoch/test_accuracy")
    assert [r["epoch/test_accuracy"] for r in epochs] == [
        m["test_accuracy"] for m in read_jsonl(out / METRICS_FILE)
    ]
    assert f"upload it with: wandb sync {run_dir}" in result.stdout


def test_mode_is_flag_then_wandb_mode_then_online_only_with_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(TrackingConfig()) == "offline"  # no credentials for W&B's host
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode(TrackingConfig()) == "online"  # what `wandb login` writes
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode(TrackingConfig()) == "offline"  # logged in elsewhere only
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode(TrackingConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(TrackingConfig()) == "disabled"
    assert not wants_wandb(TrackingConfig(tracker="wandb"))
    assert wandb_mode(TrackingConfig(wandb_mode="offline")) == "offline"  # the flag wins
    assert wants_wandb(TrackingConfig(tracker="wandb", wandb_mode="offline"))
    assert not wants_wandb(TrackingConfig(tracker="none", wandb_mode="offline"))


def test_the_readme_lists_every_tracking_flag():
    readme = (ROOT / "README.md").read_text()
    for f in dataclasses.fields(TrackingConfig):
        assert f"`--{f.name.replace('_', '-')}" in readme, f.name


def test_stopped_and_resumed_job_continues_its_wandb_run_with_increasing_steps(
    tiny_mnist, tmp_path
):
    out = tmp_path / "r"
    args = (
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", "--log-every", "1", "--tracker", "wandb",
    )  # fmt: skip
    env = wandb_env(tmp_path)
    first = start_cli(
        *args, launched=False, env={**env, **fault_env(STEP_SLEEP=0.1)}, workdir=tmp_path / "1"
    )
    wait_for_step(out, 10, first)  # epoch 2 of 8-step epochs
    first.proc.send_signal(signal.SIGTERM)
    stopped = first.wait(timeout=120)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    resumed = run_cli(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and warnings(resumed) == []

    attempts = [read_run(next(d.glob("run-*.wandb"))) for d in offline_runs(out)]
    assert len(attempts) == 2  # one offline file per attempt, both of the same W&B run
    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    assert [a.run_id for a in attempts] == [run_id, run_id]
    first_steps, resumed_steps = (
        [row["global_step"] for row in a.rows_with("train/loss")] for a in attempts
    )
    if first_steps[0] > resumed_steps[0]:  # folder names sort by time of day, not attempt
        first_steps, resumed_steps = resumed_steps, first_steps
    steps = first_steps + resumed_steps
    assert steps == sorted(set(steps))  # strictly increasing across the two attempts
    assert steps == list(range(1, 17))  # and nothing lost: every step of both epochs
