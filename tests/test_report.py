"""``mnist-dist report``: the per-epoch table of real runs, side by side, and the PNG."""

import signal

import pytest
from helpers import (
    fault_env,
    make_tiny_mnist,
    read_jsonl,
    run_cli,
    run_here,
    start_cli,
    wait_for_step,
)

from mnist_dist.errors import EXIT_STOPPED
from mnist_dist.layout import METRICS_FILE, STEPS_FILE
from mnist_dist.report import draw_curves, load_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short real runs that differ in learning rate and length."""
    root = tmp_path_factory.mktemp("report")
    data = make_tiny_mnist(root / "tiny")
    runs = []
    for name, lr, epochs in (("slow", "1e-4", "2"), ("fast", "3e-3", "3")):
        out = root / name
        result = run_here(
            "train", "--data-dir", str(data), "--output-dir", str(out), "--epochs", epochs,
            "--batch-size", "32", "--lr", lr, "--log-every", "2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(out)
    return runs


def test_one_run_prints_every_epoch_from_metrics_jsonl(two_runs):
    run = two_runs[1]
    result = run_here("report", str(run))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "epoch", "lr", "train", "loss", "train", "acc", "test", "loss", "test", "acc",
        "seconds", "images/s",
    ]  # fmt: skip
    metrics = read_jsonl(run / METRICS_FILE)
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
    result = run_here("report", *map(str, two_runs))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["slow", "fast"]
    slow, fast = (read_jsonl(run / METRICS_FILE) for run in two_runs)
    epoch3 = lines[4].split()  # the shorter run has no third epoch
    assert epoch3[:5] == ["3", "-", "-", "-", "-"]
    assert epoch3[-1] == f"{fast[2]['test_accuracy']:.2%}"
    epoch1 = lines[2].split()
    assert epoch1[1] == f"{slow[0]['lr']:.1e}" and epoch1[5] == f"{fast[0]['lr']:.1e}"
    assert epoch1[4] == f"{slow[0]['test_accuracy']:.2%}"


def test_plot_writes_a_png_of_the_curves(two_runs, tmp_path):
    png = tmp_path / "curves.png"
    result = run_here("report", *map(str, two_runs), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_the_curves_show_step_losses_on_a_log_scale_and_zoom_the_accuracy(two_runs):
    import matplotlib.pyplot as plt

    runs = {run.name: load_run(run) for run in two_runs}
    fig = draw_curves(runs)
    try:
        loss_ax, acc_ax, _ = fig.axes
        assert loss_ax.get_yscale() == "log"
        # Every step record is drawn, at its fraction of an epoch.
        steps = read_jsonl(two_runs[1] / STEPS_FILE)
        (step_line,) = [
            line for line in loss_ax.lines if line.get_label() == "fast train (every step record)"
        ]
        assert len(step_line.get_xdata()) == len(steps) > 0
        assert step_line.get_xdata()[-1] == pytest.approx(3.0)  # the last step ends epoch 3
        # The accuracy axis spans the epochs after the first, not 0 to 100%.
        later = [r.test_accuracy for run in runs.values() for r in run.epochs[1:]]
        later += [r.train_accuracy for run in runs.values() for r in run.epochs[1:]]
        low, high = acc_ax.get_ylim()
        assert low <= min(later) and max(later) <= high
        assert high - low < 1.5 * (max(later) - min(later)) + 0.002
    finally:
        plt.close(fig)


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
        (run / METRICS_FILE).write_text("")
    elif problem == "not-json":
        (run / METRICS_FILE).write_text("epoch 1\n{}\n")
    result = run_here("report", str(run))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    expected = {
        "missing": "is not a run directory (no metrics.jsonl, steps.jsonl or status.json)",
        "empty": "has no finished epoch yet",
        "not-json": "metrics.jsonl, line 1: not a JSON record",
    }[problem]
    assert line.startswith("mnist-dist: error: ") and expected in line


def test_a_run_inside_its_first_epoch_shows_what_is_known(tmp_path):
    data = make_tiny_mnist(tmp_path / "tiny")  # 8 steps of 32 images per epoch
    out = tmp_path / "run"
    # A slow step (1.5 s) keeps the run inside its first epoch while it is looked at.
    started = start_cli(
        "train", "--data-dir", str(data), "--output-dir", str(out), "--batch-size", "32",
        "--log-every", "1", launched=False, env=fault_env(STEP_SLEEP=1.5), workdir=tmp_path / "p",
    )  # fmt: skip
    wait_for_step(out, 1, started)
    running = run_cli("report", str(out))
    started.proc.send_signal(signal.SIGTERM)
    assert started.wait(timeout=120).returncode == EXIT_STOPPED
    assert running.returncode == 0, running.stderr
    assert "run: running in epoch 1, no epoch finished yet; at global step" in running.stdout

    assert not (out / METRICS_FILE).exists()
    stopped = run_cli("report", str(out))
    assert stopped.returncode == 0, stopped.stderr
    steps = read_jsonl(out / STEPS_FILE)
    last = steps[-1]
    lines = stopped.stdout.splitlines()
    assert lines[0].split() == ["global", "step", "epoch", "lr", "train", "loss", "images/s"]
    assert [line.split()[0] for line in lines[1 : 1 + len(steps)]] == [
        str(s["global_step"]) for s in steps
    ]
    assert (
        f"run: stopped in epoch 1, no epoch finished yet; at global step {last['global_step']}: "
        f"train loss {last['train_loss']:.4f}, {last['images_per_second']:,.0f} images/s"
    ) in lines
    assert f"  signal SIGTERM: stopped at epoch 1, step {last['global_step']} " in stopped.stdout
    # Resumed from a checkpoint inside epoch 1, a run rewinds metrics.jsonl to no records.
    (out / METRICS_FILE).write_text("")
    assert run_cli("report", str(out)).stdout == stopped.stdout
