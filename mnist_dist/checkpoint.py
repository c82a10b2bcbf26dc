"""Model weights on disk: the final export (safetensors + model config) and loading any
weights a user hands us, including a plain ``state_dict`` from the reference implementation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mnist_dist.errors import UsageError
from mnist_dist.model import MnistCNN, ModelConfig

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def export_model(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write the final weights as safetensors, with the model config in the header, atomically."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    header = {"format": "pt", "model_config": json.dumps(config.to_dict())}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=header)
    os.replace(partial, path)


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
    """Tensors and model config from a safetensors export or a torch ``state_dict`` file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UsageError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if path.suffix != ".safetensors" and (head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC))):
        return _read_torch(path), ModelConfig()
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable safetensors weights file: {reason}") from None
    try:
        config = ModelConfig(**json.loads(header["model_config"]))
    except KeyError:
        config = ModelConfig()  # plain safetensors without our header: the reference shape
    except (TypeError, ValueError):
        raise UsageError(f"{path} has an invalid model_config in its header") from None
    return _strip_wrappers(state), config


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: never unpickle arbitrary code (and never fall back on failure).
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in reason:
            reason = "it holds pickled objects other than tensors (refusing to unpickle them)"
        raise UsageError(f"{path} is not a readable torch state_dict: {reason}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    return _strip_wrappers(obj)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
