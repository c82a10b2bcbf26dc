"""Helpers for the tests: write IDX files, run the real command line (plain or launched)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"
FAULTS = Path(__file__).parent / "faults"  # a sitecustomize that injects faults into children


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.pop("MNIST_DIST_DATA_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


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


def launch_cli(
    *args: str,
    config: str = "cpu_ddp.yaml",
    launcher_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> Result:
    """``accelerate launch --config_file accelerate_configs/CONFIG -m mnist_dist ARGS``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
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
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(env), cwd=ROOT, timeout=timeout
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


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
