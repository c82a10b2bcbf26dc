"""``mnist-dist report``: the per-epoch table of real runs, side by side, and the PNG."""

import pytest
from helpers import fault_env, make_tiny_mnist, read_jsonl, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short real runs that differ in learning rate and length."""
    root = tmp_path_factory.mktemp("report")
    data = make_tiny_mnist(root / "tiny")
    runs = []
    for name, lr, epochs in (("slow", "1e-4", "2"), ("fast", "3e-3", "3")):
        out = root / name
        result = run_cli(
            "train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", epochs,
            "--batch-size", "32", "--lr", lr,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(out)
    return runs


def test_one_run_prints_every_epoch_from_metrics_jsonl(two_runs):
    run = two_runs[1]
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "epoch", "lr", "train", "loss", "train", "acc", "test", "loss", "test", "acc",
        "seconds", "images/s",
    ]  # fmt: skip
    metrics = read_jsonl(run / "metrics.jsonl")
    for record, line in zip(metrics, lines[1:4], strict=True):
        cells = line.split()
        assert cells[0] == str(record["epoch"])
        assert cells[4] == f"{record['test_loss']:.4f}"
        assert cells[5] == f"{record['test_accuracy']:.2%}"
    best = max(metrics, key=lambda r: r["test_accuracy"])
    assert (
        f"fast: test accuracy {metrics[-1]['test_accuracy']:.2%} "
        f"({metrics[-1]['test_correct']}/{metrics[-1]['test_total']}) after epoch 3; "
        f"best {best['test_accuracy']:.2%} at epoch {best['epoch']}"
    ) in result.stdout


def test_several_runs_side_by_side(two_runs):
    result = run_cli("report", *map(str, two_runs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["slow", "fast"]
    slow, fast = (read_jsonl(run / "metrics.jsonl") for run in two_runs)
    epoch3 = lines[4].split()  # the shorter run has no third epoch
    assert epoch3[:5] == ["3", "-", "-", "-", "-"]
    assert epoch3[-1] == f"{fast[2]['test_accuracy']:.2%}"
    epoch1 = lines[2].split()
    assert epoch1[1] == f"{slow[0]['lr']:.1e}" and epoch1[5] == f"{fast[0]['lr']:.1e}"
    assert epoch1[4] == f"{slow[0]['test_accuracy']:.2%}"


def test_plot_writes_a_png_of_the_curves(two_runs, tmp_path):
    png = tmp_path / "curves.png"
    result = run_cli("report", *map(str, two_runs), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_plot_without_matplotlib_is_one_line(two_runs, tmp_path):
    result = run_cli(
        "report", str(two_runs[0]), "--plot", str(tmp_path / "c.png"),
        env=fault_env(HIDE_MODULES="matplotlib"),
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "mnist-dist: error: --plot needs matplotlib: pip install 'mnist-dist[plot]'"
    ]
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("problem", ["missing", "empty", "not-json"])
def test_bad_run_directory_is_one_line(problem, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    if problem == "empty":
        (run / "metrics.jsonl").write_text("")
    elif problem == "not-json":
        (run / "metrics.jsonl").write_text("epoch 1\n{}\n")
    result = run_cli("report", str(run))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    expected = {
        "missing": "is not a run directory (cannot read metrics.jsonl",
        "empty": "has no finished epoch yet",
        "not-json": "metrics.jsonl, line 1: not a JSON record",
    }[problem]
    assert line.startswith("mnist-dist: error: ") and expected in line
