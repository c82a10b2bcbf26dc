"""What a person watching a run sees: plain progress lines in a log or pipe, the bars on a
terminal. Both through real processes: a pipe and a pseudo-terminal are what they test."""

import itertools
import re

from helpers import fault_env, read_jsonl, run_cli_in_terminal, run_cli_piped

from mnist_dist.console import MILESTONE_GAP, MILESTONES
from mnist_dist.layout import METRICS_FILE

PROGRESS = re.compile(
    r"^epoch (\d+)/2  step (\d+)/64 \((\d+)%\)(  loss \d+\.\d{4})?  [\d,]+ images/s"
    r"  ETA epoch \d:\d\d:\d\d, run \d:\d\d:\d\d$"
)


def test_piped_output_shows_progress_inside_each_epoch_at_a_bounded_rate(tiny_mnist, tmp_path):
    every = 1.2  # seconds; 30 by default
    out = tmp_path / "run"
    code, lines = run_cli_piped(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "4", "--log-every", "8", "--progress-every", str(every),
        env=fault_env(STEP_SLEEP=0.05),  # 64 steps of at least 50 ms: epochs of 3 s or more
    )  # fmt: skip
    text = "\n".join(line for _, line in lines)
    assert code == 0, text
    progress = [(t, PROGRESS.match(line)) for t, line in lines if line.startswith("epoch ")]
    progress = [(t, m) for t, m in progress if m]
    epochs = {record["epoch"]: record for record in read_jsonl(out / METRICS_FILE)}
    for epoch, record in epochs.items():
        mine = [(t, m) for t, m in progress if int(m[1]) == epoch]
        # Alive: a line every `every` seconds of training (once a step ends) ...
        assert len(mine) >= int(record["train_seconds"] / (2 * every)) >= 1, text
        steps = [int(m[2]) for _, m in mine]
        assert steps == sorted(set(steps)) and all(0 < s < 64 for s in steps), text
        # ... and bounded: a line per `every` seconds, plus one per quarter of the epoch.
        assert len(mine) <= record["train_seconds"] / every + MILESTONES, text
        # Lines come no closer than a sixth of `every` (as the child prints them; the pipe
        # may bunch them up a little on a busy machine).
        gaps = sorted(b - a for (a, _), (b, _) in itertools.pairwise(mine))
        assert not gaps or gaps[len(gaps) // 2] >= every * MILESTONE_GAP, (gaps, text)
    assert [int(m[1]) for _, m in progress][-1] == 2 and len(epochs) == 2


def test_a_terminal_shows_the_status_before_training_and_the_whole_runs_eta(tiny_mnist, tmp_path):
    code, screen = run_cli_in_terminal(
        "train", "--data-dir", str(tiny_mnist), "--output-dir", str(tmp_path / "r"),
        "--epochs", "2", "--batch-size", "32", "--log-every", "2",
    )  # fmt: skip
    assert code == 0, screen[-2000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen)
    assert "loading the test set…" in plain  # not "epoch 0/2" while it prepares
    assert "epoch 0/" not in plain
    assert re.search(r"whole run .* \d+/16 .* ETA", plain)  # 2 epochs of 8 steps
    assert re.search(r"epoch 2/2 .* \d+/8 .* ETA", plain)
