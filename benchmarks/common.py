"""What the benchmark scripts share; standard library only, so that importing it is cheap."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MNIST_DIST_DATA_DIR") or "./data",
        help="folder holding MNIST/raw/*-ubyte (default: env MNIST_DIST_DATA_DIR or ./data)",
    )


def one_line(text: str) -> str:
    """Why a command failed: the last error line mnist-dist or Python printed, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (r"^mnist-dist: error:", r"^[\w.]*(Error|Exception)\b.*:", r"error:"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


def write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)  # a reader never sees half a file


def columns(rows: list[list[str]], right: bool = False) -> str:
    """``rows`` (the first a header) aligned under a rule; ``right``: all but column 1 right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in [rows[0], ["-" * w for w in widths], *rows[1:]]:
        cells = [
            c.rjust(w) if right and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
