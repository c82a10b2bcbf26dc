"""Read back what W&B wrote: the records of an offline run's ``run-*.wandb`` file.

wandb ships no Python reader for that file. It is a 7-byte header (``:W&B``, a u16 magic, a u8
version) followed by LevelDB-log framing: 32 KiB blocks counted from the start of the file, each
chunk a 7-byte header (crc32 u32 over the type byte and data, length u16, type u8: 1 full,
2 first, 3 middle, 4 last) and its data; a block tail shorter than a chunk header is zero
padding. Each complete payload is a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    """Every record in the file, checking each chunk's checksum."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if kind == 0 and length == 0:  # zero padding
            pos += BLOCK - pos % BLOCK
            continue
        assert len(chunk) == length, f"truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _value(item: Any) -> Any:
    """A history/summary/config item's value (typed fields or the JSON text)."""
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind and kind != "value_json":
        return getattr(item, kind)
    return json.loads(item.value_json)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class RunFile:
    """The parts of a W&B run the tests look at."""

    run_id: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    metrics: list[pb.MetricRecord] = field(default_factory=list)
    exit_code: int | None = None
    raw: bytes = b""

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]


def read_run(path: Path) -> RunFile:
    """Fold a run file's records into config, history rows, summary, artifacts and metrics."""
    run = RunFile(raw=path.read_bytes())
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            for item in record.run.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item)
        elif kind == "history":
            run.history.append({_key(item): _value(item) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "metric":
            run.metrics.append(record.metric)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
