"""Final weights: the safetensors export with its model config, and reading a weights file."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mnist_dist.errors import UsageError, WriteError, first_line, write_failure
from mnist_dist.layout import CHECKPOINT_MODEL_FILE, partial_file
from mnist_dist.model import MnistCNN, ModelConfig


def export_model(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write the final weights as safetensors, with the model config in the header, atomically."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    header = {"format": "pt", "model_config": json.dumps(config.to_dict())}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    partial = partial_file(path)
    try:
        save_file(tensors, str(partial), metadata=header)
        os.replace(partial, path)
    except (OSError, SafetensorError) as e:
        partial.unlink(missing_ok=True)  # may hold the last free bytes of a full disk
        raise WriteError(f"cannot write {path}: {write_failure(e, path.parent)}") from None


def load_model(path: str | Path) -> MnistCNN:
    """Rebuild the CNN from a safetensors export, a checkpoint folder or a torch state_dict
    file, strictly: every key and shape must match."""
    state, config = _read_weights(Path(path))
    # Without the key prefixes of DDP and torch.compile, as in Accelerate's checkpoints.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = MnistCNN(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = [f"missing {_preview(missing)}"] if missing else []
    problems += [f"unexpected {_preview(unexpected)}"] if unexpected else []
    problems += [
        f"{key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
        for key, tensor in state.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if problems:
        raise UsageError(f"{path} does not hold MNIST CNN weights: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def _preview(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The format is read from the file's first bytes, not its name."""
    if path.is_dir() and (path / CHECKPOINT_MODEL_FILE).exists():
        path = path / CHECKPOINT_MODEL_FILE
    try:
        with open(path, "rb") as f:
            head, size = f.read(16), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UsageError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if head.startswith(b"PK\x03\x04"):  # torch.save's default (zip) format
        return _read_torch(path, "zip archive"), ModelConfig()
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # legacy: a pickle PROTO opcode
        return _read_torch(path, "pickle"), ModelConfig()
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return _read_safetensors(path, 8 + int.from_bytes(head[:8], "little"), size)
    if not size:
        start = "it is empty"
    elif head[:12].isascii() and all(c.isprintable() or c.isspace() for c in head[:12].decode()):
        start = f"it starts with {head[:12].decode()!r}" + ("..." if size > 12 else "")
    else:
        start = f"it starts with the bytes {head[:8].hex(' ')}"
    raise UsageError(
        f"{path} is not a weights file: it is neither a PyTorch checkpoint (zip or pickle) nor "
        f"safetensors ({start})"
    )


def _read_safetensors(
    path: Path, header_end: int, size: int
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        # safetensors' own words for a cut file are "incomplete metadata, file not fully covered"
        reason = _safetensors_truncation(path, header_end, size) or first_line(e)
        raise UsageError(f"{path} is not a readable safetensors weights file: {reason}") from None
    try:  # plain safetensors without our header: the reference shape
        config = ModelConfig(**json.loads(header.get("model_config", "{}")))
    except (TypeError, ValueError):
        raise UsageError(f"{path} has an invalid model_config in its header") from None
    return state, config


def _safetensors_truncation(path: Path, header_end: int, size: int) -> str | None:
    if size < header_end:
        return f"it is truncated: {size} bytes, its header alone announces {header_end}"
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(header_end)[8:])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    end = header_end + max(ends, default=0)
    return f"it is truncated: {size} bytes, its header describes {end}" if size < end else None


def _read_torch(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: never unpickle arbitrary code (and never fall back on failure).
        # An open file, not the path: torch.load reads any path that ends in .safetensors as
        # safetensors, whatever the file holds.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = first_line(e)
        if kind == "zip archive" and not zipfile.is_zipfile(path):  # torch may say "Errno 22"
            reason = (
                f"it is truncated or damaged ({path.stat().st_size:,} bytes, without the "
                "end-of-archive record that a complete file ends with)"
            )
        elif "Weights only load failed" in reason:
            reason = "it holds pickled objects other than tensors (refusing to unpickle them)"
        raise UsageError(
            f"{path} is a {kind} but not a readable torch state_dict: {reason}"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    return obj
