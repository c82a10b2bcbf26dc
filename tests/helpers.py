"""Helpers for the tests: write IDX files, run the real command line (plain or launched)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from mnist_dist.layout import STATUS_FILE, STEPS_FILE, SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"
FAULTS = Path(__file__).resolve().parent / "faults"


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST uses."""
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_tiny_mnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """A small, learnable MNIST-shaped dataset: digit d lights up row band d."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, d in enumerate(labels):
            images[i, 2 + 2 * d : 4 + 2 * d, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)
    return root


def gzip_file(path: Path) -> None:
    with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
        dst.write(src.read())


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        """The errors mnist-dist itself printed (a launcher adds its own report around them)."""
        return [line for line in self.stderr.splitlines() if line.startswith("mnist-dist: error:")]

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of every process a test starts: none of the caller's W&B, Accelerate or
    data-dir settings, and no GPU unless ``extra`` gives one back (``gpu_env``).

    The tests describe mnist-dist on a machine without a GPU: device cpu, fp16 refused, two
    gloo ranks from cpu_ddp.yaml, the CPU's numbers. On a GPU workstation the same commands
    would take the GPU and do something else, so every started process sees no CUDA device
    (``CUDA_VISIBLE_DEVICES=""``), which makes that machine the CPU-only one the tests describe.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.pop("MNIST_DIST_DATA_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


def gpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` for a test of the GPU path: the started process sees the CUDA devices this pytest
    process sees (all of them when ``CUDA_VISIBLE_DEVICES`` is unset), not none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    return {"CUDA_VISIBLE_DEVICES": visible, **(extra or {})}


def cuda_available() -> bool:
    """A CUDA GPU is visible to this pytest process (and so to ``gpu_env`` processes)."""
    import torch

    return torch.cuda.is_available()


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 600
) -> Result:
    """``python -m mnist_dist ARGS`` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_dist", *args],
        capture_output=True,
        text=True,
        env=_env(env),
        cwd=cwd or ROOT,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_here(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """``python -m mnist_dist ARGS`` as ``run_cli`` runs it, but in this process: the real entry
    point ``mnist_dist.__main__.main`` with the environment, working directory, argv, output
    streams and warning filters of a fresh child, and every global a run can change put back
    afterwards (``_as_a_fresh_process``). It saves the 3-5 s of imports a child pays.

    For what a child alone shows, use ``run_cli``: faults (their sitecustomize loads only at a
    child's start), signals, terminals, W&B, what gets imported, the exit through the
    interpreter. Where this process sees a CUDA GPU that the child would not
    (``CUDA_VISIBLE_DEVICES=""``, which CUDA reads once per process) or ``PYTHONWARNINGS`` is
    set (read at a start), the command runs in a child after all.
    """
    child_env = _env(env)
    if any(name.startswith("MNIST_DIST_FAULT_") for name in child_env):
        raise ValueError("faults are injected at a child's start: use run_cli for this command")
    hidden_gpu = child_env.get("CUDA_VISIBLE_DEVICES") == "" and cuda_available()
    if hidden_gpu or child_env.get("PYTHONWARNINGS"):
        return run_cli(*args, env=env, cwd=cwd)

    import io
    import traceback

    from mnist_dist.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with (
        _as_a_fresh_process(child_env, cwd or ROOT, args),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = main(list(args))
        except SystemExit as e:  # --help, and what sys.exit would end a child with
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    return Result(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _as_a_fresh_process(env: dict[str, str], cwd: Path, args: tuple[str, ...]) -> Iterator[None]:
    """This process as a child started with ``env`` in ``cwd`` would be, for the duration:
    then everything a run of mnist-dist can change is put back as it was."""
    import logging
    import random
    import signal
    import warnings

    import torch
    from accelerate.state import AcceleratorState, GradientState

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    catchable = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
    saved_signals = {sig: signal.getsignal(sig) for sig in catchable}
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved_once = dict(warnings.onceregistry)
    saved_torch = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )
    saved_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [str(ROOT / "mnist_dist" / "__main__.py"), *args]  # as `python -m` sets it
    # A child prints a logger's warnings through logging's last-resort handler, which only
    # runs where the root logger has no handler; pytest's log capture adds some.
    root.handlers = []
    try:
        with warnings.catch_warnings():
            # A child starts with Python's default filters, an empty "already shown" registry
            # (changing the filters invalidates the per-module ones) and warnings on stderr;
            # pytest's own filters and recorder would hide what a user sees.
            warnings.resetwarnings()
            for category, module in (
                (DeprecationWarning, "__main__"),
                (DeprecationWarning, ""),
                (PendingDeprecationWarning, ""),
                (ImportWarning, ""),
                (ResourceWarning, ""),
            ):
                action = "default" if module else "ignore"
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.onceregistry.clear()
            warnings.showwarning = _show_warning
            yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.use_deterministic_algorithms(saved_torch[0], warn_only=saved_torch[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved_torch[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_torch[3:5]
        torch.set_num_threads(saved_torch[5])
        torch.set_rng_state(saved_rng[0])
        random.setstate(saved_rng[1])
        np.random.set_state(saved_rng[2])
        warnings.onceregistry.clear()
        warnings.onceregistry.update(saved_once)
        root.handlers, root.level = saved_root
        for sig, handler in saved_signals.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    # W&B keeps its run, settings and service in module globals: not for this process to share.
    if "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
        raise AssertionError("a W&B run started in this process: use run_cli")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` as Python's own: the formatted warning on (the current)
    stderr."""
    import warnings

    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def launch_command(
    *args: str, config: str = "cpu_ddp.yaml", launcher_args: tuple[str, ...] = ()
) -> list[str]:
    """``accelerate launch --config_file accelerate_configs/CONFIG -m mnist_dist ARGS``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate),
        "launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--main_process_port",
        str(free_port()),
        *launcher_args,
        "-m",
        "mnist_dist",
        *args,
    ]


def launch_cli(
    *args: str,
    config: str = "cpu_ddp.yaml",
    launcher_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> Result:
    """Run ``launch_command(ARGS)`` to the end."""
    cmd = launch_command(*args, config=config, launcher_args=launcher_args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(env), cwd=ROOT, timeout=timeout
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def fault_env(**faults: str | int | float) -> dict[str, str]:
    """Environment that makes the started processes load ``tests/faults/sitecustomize.py``
    with the given faults, e.g. ``fault_env(STEP_SLEEP=0.05)``."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))}
    env.update({f"MNIST_DIST_FAULT_{name}": str(value) for name, value in faults.items()})
    return env


class Started:
    """A command started in the background, its output collected in files."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(env), cwd=ROOT)

    def wait(self, timeout: float = 600) -> Result:
        code = self.proc.wait(timeout=timeout)
        return Result(code, self.out_path.read_text(), self.err_path.read_text())


def start_cli(*args: str, launched: bool, env: dict[str, str] | None, workdir: Path) -> Started:
    """Start ``mnist-dist ARGS`` in the background: plain, or under ``accelerate launch`` with
    two CPU processes."""
    cmd = launch_command(*args) if launched else [sys.executable, "-m", "mnist_dist", *args]
    return Started(cmd, env, workdir)


def wait_for_step(run_dir: Path, global_step: int, started: Started, timeout: float = 300) -> None:
    """Wait until ``steps.jsonl`` in ``run_dir`` records ``global_step`` (or later)."""
    import time

    steps = run_dir / STEPS_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steps.exists():
            records = read_jsonl_tolerant(steps)
            if records and records[-1]["global_step"] >= global_step:
                return
        if started.proc.poll() is not None:
            raise AssertionError(f"the run ended before step {global_step}: {started.wait()}")
        time.sleep(0.02)
    raise AssertionError(f"step {global_step} not reached in {timeout}s")


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """Records of a JSONL file that is being written (a partial last line is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_bit_identical(a: Path, b: Path) -> None:
    """Two weight files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not wa[k].equal(wb[k])]
    assert not differing, f"weights differ in {differing}"


def tree_hashes(run_dir: Path) -> dict[str, str]:
    """The sha256 of every file under ``run_dir``, by relative path."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def read_plan(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines ``mnist-dist doctor --write-env`` wrote."""
    import shlex

    return dict(shlex.split(line)[1].split("=", 1) for line in path.read_text().splitlines())


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def read_status(run_dir: Path) -> dict:
    return json.loads((run_dir / STATUS_FILE).read_text())


def run_cli_in_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """``python -m mnist_dist ARGS`` with stdout on a pseudo-terminal, as a user sees it."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_dist", *args],
        stdout=slave,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=_env({"COLUMNS": "160", "TERM": "xterm-256color"}),
        cwd=ROOT,
    )
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), output.decode(errors="replace")


def run_cli_piped(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[int, list[tuple[float, str]]]:
    """``python -m mnist_dist ARGS`` with its output (stdout and stderr) read from a pipe, as
    ``| tee`` or a SLURM log gets it: the exit code and each line with the ``time.monotonic()``
    at which it arrived."""
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_dist", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(env),
        cwd=ROOT,
    )
    lines = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.monotonic(), line.rstrip("\n")))
        return proc.wait(timeout=timeout), lines
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past ``max_bytes`` fail in this process with EFBIG ("File too large"), as the
    kernel enforces RLIMIT_FSIZE; SIGXFSZ, which would end the process, is ignored meanwhile.

    Every write of the process is limited, pytest's own output included: keep the block around
    the product's writes, inside the test body (never in a fixture, whose teardown comes after
    pytest reports the test)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
