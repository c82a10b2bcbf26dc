"""The run-directory contract (``mnist_dist.layout``), the typed records (``mnist_dist.records``)
and ``RunDir``'s writes, in this process; the records against those a real run wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import file_size_limit, make_tiny_mnist, run_cli

from mnist_dist.config import CheckpointConfig
from mnist_dist.errors import UsageError, WriteError
from mnist_dist.layout import (
    METRICS_FILE,
    STATES,
    STEPS_FILE,
    RunLayout,
    checkpoint_name,
    parse_checkpoint_name,
    parse_resume,
    partial_checkpoint,
    partial_file,
    run_dir_of,
)
from mnist_dist.records import EpochRecord, RecordError, StepRecord, Summary
from mnist_dist.rundir import RunDir, resolve_run_dir


def test_the_run_directory_names_are_the_ones_runs_have_always_written(tmp_path):
    # Renaming any of these breaks the readers of existing runs and slurm/train.sbatch.
    layout = RunLayout(tmp_path)
    names = {
        "config": "config.yaml",
        "metrics": "metrics.jsonl",
        "steps": "steps.jsonl",
        "summary": "summary.json",
        "model": "model.safetensors",
        "status": "status.json",
        "claim": "claim.json",
        "stop": "STOP",
        "wandb_run_id": "wandb-run-id.txt",
        "wandb": "wandb",
        "checkpoints": "checkpoints",
    }
    assert {prop: getattr(layout, prop) for prop in names} == {
        prop: tmp_path / name for prop, name in names.items()
    }
    assert layout.checkpoint(2, 7) == tmp_path / "checkpoints" / "epoch-002-step-000007"
    assert partial_file(layout.summary) == tmp_path / ".summary.json.partial"
    assert partial_checkpoint(layout.checkpoint(1, 0)).name == ".partial-epoch-001-step-000000"
    assert STATES == ("running", "finished", "stopped", "diverged", "failed")


@pytest.mark.parametrize("epoch, step", [(1, 0), (2, 7), (10, 937), (999, 999_999)])
def test_a_checkpoint_name_reads_back_as_its_position(epoch, step, tmp_path):
    name = checkpoint_name(epoch, step)
    assert parse_checkpoint_name(name) == (epoch, step)
    checkpoint = RunLayout(tmp_path / "run").checkpoint(epoch, step)
    assert checkpoint.name == name
    assert run_dir_of(checkpoint) == tmp_path / "run"


def test_checkpoint_names_sort_in_training_order_and_others_are_not_checkpoints():
    positions = [(1, 5), (1, 10), (2, 0), (2, 14), (10, 0)]
    names = [checkpoint_name(*p) for p in positions]
    assert names[1] == "epoch-001-step-000010"
    assert sorted(names) == names
    for other in (
        ".partial-epoch-001-step-000005",
        ".partial-old-epoch-001-step-000005",
        "epoch-001-step-000005.tmp",
        "epoch-1-step-x",
        "COMPLETE",
    ):
        assert parse_checkpoint_name(other) is None, other


def test_the_trainer_states_checkpoint_name_is_the_layouts():
    from mnist_dist.checkpoint import TrainerState

    assert TrainerState(epoch=3, step=12).name == checkpoint_name(3, 12)


@pytest.mark.parametrize(
    "value, mode, path",
    [
        ("auto", "auto", None),
        ("never", "never", None),
        ("r/checkpoints/epoch-002-step-000000", "path", "r/checkpoints/epoch-002-step-000000"),
        ("Auto", "path", "Auto"),  # only the exact words are modes; anything else is a folder
        (" ", "path", " "),
    ],
)  # fmt: skip
def test_resume_values(value, mode, path):
    resume = parse_resume(value)
    assert resume.mode == mode
    assert resume.path == (Path(path) if path else None)
    assert (resume.auto, resume.never) == (mode == "auto", mode == "never")


def test_an_empty_resume_is_refused_in_one_line():
    message = "--resume must be auto, never or a checkpoint folder"
    with pytest.raises(UsageError, match=f"^{message}$"):
        parse_resume("")
    with pytest.raises(UsageError, match=f"^{message}$"):
        CheckpointConfig(resume="")


def test_a_resume_path_chooses_the_run_directory_it_belongs_to(cpu_accelerator, tmp_path):
    checkpoint = RunLayout(tmp_path / "first").checkpoint(2, 0)
    assert resolve_run_dir(cpu_accelerator, None, str(checkpoint)) == RunLayout(tmp_path / "first")
    output_dir = resolve_run_dir(cpu_accelerator, str(tmp_path / "o"), str(checkpoint))
    assert output_dir == RunLayout(tmp_path / "o")
    assert resolve_run_dir(cpu_accelerator, None, "auto").root.parent == Path("runs")


def test_readers_of_the_run_directory_do_not_import_torch():
    code = (
        "import sys, mnist_dist.layout, mnist_dist.records, mnist_dist.report; "
        "print(sorted(m for m in ('torch', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- Records, against a real run's files ---------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> RunLayout:
    """A tiny real run: 2 epochs of 8 steps, a step record every 3 steps."""
    root = tmp_path_factory.mktemp("layout")
    data = make_tiny_mnist(root / "tiny")
    out = root / "run"
    result = run_cli(
        "train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "32", "--log-every", "3", "--tracker", "none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return RunLayout(out)


@pytest.mark.parametrize("kind, file", [(StepRecord, "steps"), (EpochRecord, "metrics")])
def test_records_read_back_to_the_exact_lines_a_run_wrote(real_run, kind, file):
    lines = getattr(real_run, file).read_text().splitlines()
    assert len(lines) >= 2
    for line in lines:
        raw = json.loads(line)
        record = kind.from_dict(raw)
        assert list(record.to_dict()) == list(raw)  # same keys, same order
        assert json.dumps(record.to_dict()) == line  # the same bytes


def test_the_summary_reads_back_to_the_file_a_run_wrote(real_run, tmp_path):
    text = real_run.summary.read_text()
    summary = Summary.from_dict(json.loads(text))
    assert summary.epochs_completed == 2 and summary.test_total == 128
    RunDir(RunLayout(tmp_path), enabled=True).write_summary(summary)
    assert RunLayout(tmp_path).summary.read_text() == text


def test_run_dir_appends_records_and_their_dicts_alike(real_run, tmp_path):
    lines = real_run.metrics.read_text().splitlines(keepends=True)
    typed, plain = RunDir(RunLayout(tmp_path), True), RunDir(RunLayout(tmp_path / "plain"), True)
    plain.path.mkdir()
    for line in lines:
        typed.append_epoch(EpochRecord.from_dict(json.loads(line)))
        plain.append_epoch(json.loads(line))
    for run_dir in (typed, plain):
        assert run_dir.layout.metrics.read_text() == "".join(lines)


STEP = {"global_step": 3, "epoch": 1, "train_loss": 2.25, "lr": 0.001, "images_per_second": 900}
EPOCH = {
    "epoch": 1, "global_step": 8, "lr": 0.001, "train_loss": 2.1, "train_accuracy": 0.25,
    "test_loss": 1.9, "test_accuracy": 0.5, "test_correct": 64, "test_total": 128,
    "train_seconds": 1.5, "epoch_seconds": 2.0, "images_per_second": 170.5,
}  # fmt: skip


def test_records_ignore_unknown_keys():
    assert StepRecord.from_dict({**STEP, "added_in_a_later_version": 1}).to_dict() == STEP
    assert EpochRecord.from_dict(EPOCH).test_accuracy == 0.5


@pytest.mark.parametrize(
    "kind, raw, message",
    [
        (StepRecord, {"epoch": 1}, "missing global_step, train_loss, lr, images_per_second"),
        (StepRecord, {**STEP, "global_step": 2.5}, "global_step is 2.5, not an integer"),
        (EpochRecord, {**EPOCH, "lr": "fast"}, "lr is 'fast', not a number"),
        (EpochRecord, {**EPOCH, "test_loss": True}, "test_loss is True, not a number"),
        (EpochRecord, [1, 2], "not a JSON object"),
    ],
)
def test_a_record_that_is_not_one_says_why(kind, raw, message):
    with pytest.raises(RecordError, match=f"^{message}$"):
        kind.from_dict(raw)


# --- RunDir's atomic writes ----------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    run_dir = RunDir(RunLayout(tmp_path), enabled=True)
    run_dir.write_status("running", epoch=1)
    before = run_dir.layout.status.read_text()
    with file_size_limit(64):  # as a nearly full disk fails
        with pytest.raises(WriteError, match=r"^cannot write .*summary\.json: File too large$"):
            run_dir.write_summary({"message": "x" * 200})
        run_dir.write_status("failed", message="y" * 200)  # best effort: says nothing
    assert run_dir.layout.status.read_text() == before
    assert not run_dir.layout.summary.exists()
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.layout.status.name]


def test_a_failed_rename_leaves_no_partial_file(tmp_path):
    run_dir = RunDir(RunLayout(tmp_path), enabled=True)
    run_dir.layout.summary.mkdir()  # in the way: the rename fails
    with pytest.raises(WriteError, match=r"^cannot write .*summary\.json: "):
        run_dir.write_summary(Summary.from_dict({**_summary(), "run_dir": str(tmp_path)}))
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.layout.summary.name]


def test_resume_rewinds_the_records_to_the_checkpoint_atomically(real_run, tmp_path):
    run_dir = RunDir(RunLayout(tmp_path), enabled=True)
    run_dir.layout.steps.write_text(real_run.steps.read_text())
    history = [EpochRecord.from_dict(json.loads(line)) for line in real_run.metrics.open()]
    run_dir.restore_records(history[:1], global_step=history[0].global_step)
    assert run_dir.layout.metrics.read_text() == real_run.metrics.read_text().splitlines(True)[0]
    steps = [StepRecord.from_dict(json.loads(s)) for s in run_dir.layout.steps.open()]
    assert steps and all(s.global_step <= history[0].global_step for s in steps)
    assert {p.name for p in tmp_path.iterdir()} == {METRICS_FILE, STEPS_FILE}


def _summary() -> dict:
    return {
        "test_accuracy": 0.5, "test_correct": 64, "test_total": 128, "test_loss": 1.9,
        "best_test_accuracy": 0.5, "best_epoch": 1, "train_loss": 2.1, "train_accuracy": 0.25,
        "world_size": 1, "distributed_type": "NO", "mixed_precision": "no",
        "global_batch_size": 32, "per_device_batch_size": 32, "epochs_completed": 1,
        "global_step": 8, "images_per_second": 170.5, "step_engine": "eager",
        "deterministic": True, "segment_wall_seconds": 3.0, "run_wall_seconds": 3.0,
        "started_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
