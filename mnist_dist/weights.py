"""Final weights: the safetensors export with its model config, and reading any weights file."""

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
from mnist_dist.layout import CHECKPOINT_MODEL_FILE
from mnist_dist.model import MnistCNN, ModelConfig

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80  # torch.save's legacy format: a pickle PROTO opcode, then protocol 2-5
_SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def export_model(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write the final weights as safetensors, with the model config in the header, atomically."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    header = {"format": "pt", "model_config": json.dumps(config.to_dict())}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=header)
        os.replace(partial, path)
    except (OSError, SafetensorError) as e:
        raise WriteError(f"cannot write {path}: {write_failure(e, path.parent)}") from None


def load_model(path: str | Path) -> MnistCNN:
    """Rebuild the CNN from a weights file, strictly: every key and shape must match."""
    state, config = read_weights(path)
    model = MnistCNN(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {_preview(missing)}")
        if unexpected:
            detail.append(f"unexpected {_preview(unexpected)}")
        raise UsageError(f"{path} does not hold MNIST CNN weights: {'; '.join(detail)}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise UsageError(
                f"{path} does not hold MNIST CNN weights: {key} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model


def _preview(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Tensors and model config from a safetensors export, a checkpoint folder or a torch
    ``state_dict`` file. The format is read from the file's first bytes, not its name."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_MODEL_FILE).exists():
        path = path / CHECKPOINT_MODEL_FILE  # a checkpoint folder: its model weights
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UsageError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if head.startswith(_ZIP_MAGIC):
        return _read_torch(path, "zip archive"), ModelConfig()
    if len(head) > 1 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
        return _read_torch(path, "pickle"), ModelConfig()
    header_bytes = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if head[8:9] == b"{" and 2 <= header_bytes <= _SAFETENSORS_MAX_HEADER:
        # safetensors: an 8-byte little-endian header length, then the JSON header.
        return _read_safetensors(path, 8 + header_bytes, size)
    raise UsageError(
        f"{path} is not a weights file: it is neither a PyTorch checkpoint (zip or pickle) nor "
        f"safetensors ({_describe_start(head, size)})"
    )


def _describe_start(head: bytes, size: int) -> str:
    """The first bytes of a file, for a message: as text if they are text."""
    if not size:
        return "it is empty"
    shown = head[:12]
    try:
        text = shown.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return f"it starts with {text!r}" + ("..." if size > len(shown) else "")
    return f"it starts with the bytes {shown[:8].hex(' ')}"


def _read_safetensors(
    path: Path, header_end: int, size: int
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        reason = _safetensors_truncation(path, header_end, size) or first_line(e)
        raise UsageError(f"{path} is not a readable safetensors weights file: {reason}") from None
    try:
        config = ModelConfig(**json.loads(header["model_config"]))
    except KeyError:
        config = ModelConfig()  # plain safetensors without our header: the reference shape
    except (TypeError, ValueError):
        raise UsageError(f"{path} has an invalid model_config in its header") from None
    return _strip_wrappers(state), config


def _safetensors_truncation(path: Path, header_end: int, size: int) -> str | None:
    """Say so when a safetensors file is shorter than its own header says (safetensors' own
    words for it are "incomplete metadata, file not fully covered"); None otherwise."""
    if size < header_end:
        return f"it is truncated: {size} bytes, its header alone announces {header_end}"
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(header_end - 8))
        data_bytes = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if size < header_end + data_bytes:
        return f"it is truncated: {size} bytes, its header describes {header_end + data_bytes}"
    return None


def _read_torch(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """A torch.save file (``kind``: "zip archive" or "pickle", from its first bytes)."""
    try:
        # weights_only=True: never unpickle arbitrary code (and never fall back on failure).
        # An open file, not the path: torch.load reads any path that ends in .safetensors as
        # safetensors, whatever the file holds.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = (kind == "zip archive" and _zip_damage(path)) or first_line(e)
        if "Weights only load failed" in reason:
            reason = "it holds pickled objects other than tensors (refusing to unpickle them)"
        raise UsageError(
            f"{path} is a {kind} but not a readable torch state_dict: {reason}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    return _strip_wrappers(obj)


def _zip_damage(path: Path) -> str | None:
    """Say how a zip archive is cut short or damaged (torch's own words for it can be
    "[Errno 22] Invalid argument"); None when the archive itself is whole."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):  # no end-of-archive record: the end is missing
        return (
            f"it is truncated or damaged ({size:,} bytes, without the end-of-archive record "
            "that a complete file ends with)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # every member against its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"it is damaged: {first_line(e)}"
    return f"it is damaged: {bad} fails its checksum" if bad else None


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
