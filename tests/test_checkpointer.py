"""The checkpointer in this process: atomic saves with a manifest, what counts as a checkpoint,
how many are kept, when a save is due, and which one ``--resume`` finds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import file_size_limit

from mnist_dist.checkpoint import (
    Checkpointer,
    TrainerState,
    complete_checkpoints,
    read_checkpoint,
)
from mnist_dist.errors import UsageError, WriteError
from mnist_dist.layout import CHECKPOINTS_DIR, MANIFEST_FILE, STATE_FILE, RunLayout
from mnist_dist.resume import locate


@pytest.fixture
def prepared(cpu_accelerator):
    """A tiny model and its optimizer, prepared, so that ``save_state`` has state to write."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = cpu_accelerator.prepare(model, optimizer)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()  # Adam's state exists: the optimizer file holds more than defaults
    return cpu_accelerator


def at(epoch: int, step: int, steps_per_epoch: int = 16) -> TrainerState:
    return TrainerState(epoch=epoch, step=step, global_step=(epoch - 1) * steps_per_epoch + step)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def no_warning(line: str) -> None:
    raise AssertionError(f"unexpected warning: {line}")


def test_a_save_writes_a_folder_whose_manifest_lists_every_file_with_size_and_sha256(
    prepared, tmp_path
):
    path = Checkpointer(prepared, RunLayout(tmp_path), keep=3).save(at(1, 5))
    assert path == RunLayout(tmp_path).checkpoints / "epoch-001-step-000005"
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    files = {p.name for p in path.iterdir()} - {MANIFEST_FILE}
    assert set(manifest) == files
    assert {"model.safetensors", "optimizer.bin", STATE_FILE} <= files
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = json.loads((path / STATE_FILE).read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 5, 5)
    assert names(RunLayout(tmp_path).checkpoints) == ["epoch-001-step-000005"]  # nothing partial


def _damage_a_file(checkpoint: Path) -> None:
    """Flip a byte of the model file, keeping its size: only the sha256 tells."""
    model = checkpoint / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))


def test_an_incomplete_or_damaged_folder_is_never_resumed_and_partial_ones_are_pruned(
    prepared, tmp_path
):
    checkpointer = Checkpointer(prepared, RunLayout(tmp_path), keep=3)
    good = checkpointer.save(at(1, 5))
    root = good.parent
    # What a killed or damaged write leaves behind, each at a newer position than ``good``:
    partial = root / ".partial-epoch-001-step-000010"  # killed during save_state
    shutil.copytree(good, partial)
    (partial / MANIFEST_FILE).unlink()
    unmarked = root / "epoch-001-step-000011"  # a folder without the manifest
    shutil.copytree(good, unmarked)
    (unmarked / MANIFEST_FILE).unlink()
    damaged = root / "epoch-001-step-000012"  # a manifest whose sha256 does not match
    shutil.copytree(good, damaged)
    _damage_a_file(damaged)

    assert complete_checkpoints(root) == [good, damaged]  # listed: it has its manifest ...
    warnings: list[str] = []
    found = locate(RunLayout(tmp_path).checkpoints, "auto", warnings.append)
    assert found == good  # ... but never resumed
    assert read_checkpoint(found).global_step == 5
    assert warnings == [
        f"warning: checkpoint file {damaged / 'model.safetensors'} is damaged: its checksum "
        "does not match; trying the previous checkpoint"
    ]

    checkpointer.save(at(1, 13))
    assert not partial.exists()  # the next save removes what killed writes left
    assert ".partial-epoch-001-step-000010" not in names(root)


def test_keep_keeps_the_newest_complete_checkpoints(prepared, tmp_path):
    checkpointer = Checkpointer(prepared, RunLayout(tmp_path), keep=2)
    saved = [checkpointer.save(at(epoch, step)) for epoch, step in [(1, 3), (1, 6), (2, 0), (2, 3)]]
    assert complete_checkpoints(RunLayout(tmp_path).checkpoints) == saved[-2:]
    assert names(RunLayout(tmp_path).checkpoints) == [
        "epoch-002-step-000000",
        "epoch-002-step-000003",
    ]


@pytest.mark.parametrize(
    ("every", "due_at"),
    [(0, []), (5, [5, 10, 15, 20, 25, 30]), (8, [8, 24])],
)
def test_a_mid_epoch_save_is_due_every_n_steps_but_never_at_an_epochs_end(
    every, due_at, cpu_accelerator, tmp_path
):
    """16 steps per epoch: the epoch's own checkpoint follows its evaluation, so step 16 and
    step 32 are never due, even when they are multiples of ``every``."""
    checkpointer = Checkpointer(cpu_accelerator, RunLayout(tmp_path), keep=3, every=every)
    due = [
        global_step
        for global_step in range(1, 33)
        if checkpointer.due(at(1 + (global_step - 1) // 16, (global_step - 1) % 16 + 1), 16)
    ]
    assert due == due_at


def test_saved_and_newest_follow_this_processs_saves_then_the_disk(prepared, tmp_path):
    checkpointer = Checkpointer(prepared, RunLayout(tmp_path), keep=3)
    assert checkpointer.newest() is None
    assert not checkpointer.saved(at(1, 5))
    first = checkpointer.save(at(1, 5))
    assert checkpointer.saved(at(1, 5)) and not checkpointer.saved(at(1, 6))
    assert checkpointer.newest() == first
    second = checkpointer.save(at(2, 0))
    assert checkpointer.newest() == second and not checkpointer.saved(at(1, 5))
    # A new process over the same run directory: the newest complete checkpoint on disk.
    later = Checkpointer(prepared, RunLayout(tmp_path), keep=3)
    assert later.newest() == second and not later.saved(at(2, 0))


def test_find_auto_never_and_a_path(prepared, tmp_path):
    run = tmp_path / "run"
    checkpointer = Checkpointer(prepared, RunLayout(run), keep=3)
    root = RunLayout(run).checkpoints
    assert locate(root, "auto", no_warning) is None  # nothing saved yet: a fresh start
    older = checkpointer.save(at(1, 5))
    newest = checkpointer.save(at(2, 0))

    found = locate(root, "auto", no_warning)
    assert found == newest and read_checkpoint(found).epoch == 2
    assert locate(root, "never", no_warning) is None
    assert locate(root, str(newest), no_warning) == newest

    with pytest.raises(UsageError, match="holds checkpoints newer than epoch-001-step-000005"):
        locate(root, str(older), no_warning)  # it would rewind the run's records
    missing = tmp_path / "missing"
    with pytest.raises(UsageError, match=f"checkpoint {missing} does not exist"):
        locate(root, str(missing), no_warning)

    # Another run directory starts a branch from it.
    assert locate(RunLayout(tmp_path / "other").checkpoints, str(older), no_warning) == older


def test_a_failed_write_is_a_write_error_and_leaves_no_partial_folder(prepared, tmp_path):
    checkpointer = Checkpointer(prepared, RunLayout(tmp_path), keep=3)
    first = checkpointer.save(at(1, 5))
    with file_size_limit(64), pytest.raises(WriteError) as failed:
        checkpointer.save(at(1, 10))
    message = str(failed.value)
    assert message.startswith(f"cannot write checkpoint {first.parent / 'epoch-001-step-000010'}:")
    assert "File too large" in message
    assert names(RunLayout(tmp_path).checkpoints) == ["epoch-001-step-000005"]  # no partial folder
    assert checkpointer.newest() == first and not checkpointer.saved(at(1, 10))
    assert locate(RunLayout(tmp_path).checkpoints, "auto", no_warning) == first


def test_a_file_where_the_checkpoints_folder_must_go_is_a_write_error(prepared, tmp_path):
    (RunLayout(tmp_path).checkpoints).write_text(
        ""
    )  # not a folder: nothing can be written under it
    with pytest.raises(WriteError, match="Not a directory"):
        Checkpointer(prepared, RunLayout(tmp_path), keep=3).save(at(1, 5))
    assert names(tmp_path) == [CHECKPOINTS_DIR] and (RunLayout(tmp_path).checkpoints).is_file()
