"""StopControl: stop requests (signals, the stop file) in this process, and two real gloo ranks
agreeing on the step boundary at which they stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from mnist_dist.errors import Stopped
from mnist_dist.layout import RunLayout
from mnist_dist.stopping import StopControl


def one_process(is_main: bool = True) -> SimpleNamespace:
    """What StopControl reads of an Accelerator, for a single process."""
    return SimpleNamespace(num_processes=1, is_main_process=is_main)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_asks_for_a_stop_at_the_next_boundary(sig, tmp_path):
    control = StopControl(one_process(), tmp_path / "STOP")
    before = signal.getsignal(sig)
    assert not control.at_step_boundary()
    with control.handling_signals():
        os.kill(os.getpid(), sig)
        assert control.reason == f"signal {sig.name}"
        assert control.at_step_boundary() and control.now()
    assert signal.getsignal(sig) == before  # the handlers are put back


def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    control = StopControl(one_process(), tmp_path / "STOP")
    with control.handling_signals():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert control.reason == "signal SIGINT"


def test_the_stop_file_is_polled_every_poll_seconds_and_now_always_looks(tmp_path):
    stop_file = tmp_path / "STOP"
    control = StopControl(one_process(), stop_file, poll_seconds=3600)
    assert not control.at_step_boundary()  # polled: no file
    stop_file.write_text("")
    assert not control.at_step_boundary()  # the next poll is an hour away
    assert control.now()  # the end of an epoch looks regardless
    assert control.reason == f"stop file {stop_file}"


def test_the_stop_file_is_seen_once_poll_seconds_have_passed(tmp_path):
    stop_file = tmp_path / "STOP"
    control = StopControl(one_process(), stop_file, poll_seconds=0.05)
    assert not control.at_step_boundary()
    stop_file.write_text("")
    time.sleep(0.1)
    assert control.at_step_boundary()


@pytest.mark.parametrize("is_main", [True, False])
def test_stopped_is_the_error_that_names_the_position_and_the_main_process_removes_the_file(
    is_main, tmp_path
):
    stop_file = tmp_path / "STOP"
    stop_file.write_text("")
    control = StopControl(one_process(is_main), stop_file)
    assert control.now()
    checkpoint = RunLayout(tmp_path).checkpoint(2, 4)
    error = control.stopped("epoch 2, step 4 (global step 20)", checkpoint)
    assert isinstance(error, Stopped) and error.exit_code == 75
    assert str(error) == (
        f"stop file {stop_file}: stopped at epoch 2, step 4 (global step 20); checkpoint "
        f"{checkpoint}"
    )  # the run adds the command that continues it (tests/test_claim.py)
    # The resumed run must not stop at once; only the main process removes the file.
    assert stop_file.exists() != is_main


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch.distributed as dist

    from mnist_dist.stopping import StopControl

    rank, store, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    accelerator = SimpleNamespace(num_processes=2, is_main_process=rank == 0)
    never = out.parent / "no-stop-file"  # only the signal asks for a stop
    report = {}
    for requester, k in ((0, 3), (1, 5)):  # rank 0 asks at boundary 3, then rank 1 at 5
        control = StopControl(accelerator, never, poll_seconds=3600)
        with control.handling_signals():
            stops = []
            for boundary in range(1, k + 4):
                if rank == requester and boundary == k:
                    os.kill(os.getpid(), signal.SIGTERM)
                if control.at_step_boundary():
                    stops.append(boundary)
                    break
            report[f"asked by rank {requester} at {k}"] = stops
            report[f"why, asked by rank {requester}"] = control.describe()
        control.close()
    # The end of an epoch agrees at once: rank 1 asks, both stop now.
    control = StopControl(accelerator, never, poll_seconds=3600)
    with control.handling_signals():
        before = control.now()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        report["now"] = [before, control.now()]
    control.close()
    dist.destroy_process_group()
    out.write_text(json.dumps(report))
    """
)


def test_two_ranks_stop_at_the_same_boundary_one_after_the_request(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "store"), str(outs[rank])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    rank0, rank1 = (json.loads(out.read_text()) for out in outs)
    # The agreement started at boundary k is read at k + 1: both ranks stop there, and
    # neither earlier.
    for report in (rank0, rank1):
        assert report["asked by rank 0 at 3"] == [4]
        assert report["asked by rank 1 at 5"] == [6]
        assert report["now"] == [False, True]
    assert rank0["why, asked by rank 0"] == rank1["why, asked by rank 1"] == "signal SIGTERM"
    assert (
        rank1["why, asked by rank 0"]
        == rank0["why, asked by rank 1"]
        == ("another rank asked to stop")
    )
