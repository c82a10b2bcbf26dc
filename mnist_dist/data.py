"""MNIST on disk, the reference preprocessing, and the two input pipelines.

Both cut each epoch's seeded permutation into global batches and give each rank a contiguous
slice of every one, so results depend on neither the world size nor the pipeline. We never
``prepare`` a DataLoader (double sharding: huggingface/accelerate#4075).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import datasets, transforms

from mnist_dist.config import DataConfig
from mnist_dist.errors import UsageError

IMAGE_SIZE = 28

# Each split's IDX files, images and labels, and its full size.
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# The published md5 of each uncompressed file, checked when it claims the full split.
_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
EXPECTED_FILES = [name for split in SPLITS.values() for name in split[:2]]
ALL_SPLITS = ("train", "test")  # what training reads; evaluation reads only "test"


def raw_dir(data_dir: str | Path) -> Path:
    """Where torchvision's MNIST reader looks for the IDX files."""
    return Path(data_dir) / "MNIST" / "raw"


def reference_transform() -> transforms.Compose:
    """The reference preprocessing: pixels in [0, 1], no normalisation."""
    return transforms.Compose(
        [transforms.Grayscale(), transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()]
    )


def as_light_on_dark(image: Image.Image) -> tuple[Image.Image, bool]:
    """``image`` in grayscale with MNIST's light strokes on a dark background, and whether it
    was inverted for that: a border brighter on average than mid-grey is a light background."""
    gray = image.convert("L")
    pixels = np.asarray(gray, dtype=np.float64)
    frame = max(1, min(pixels.shape) // 10)  # the outer tenth of the shorter side
    inner = pixels[frame:-frame, frame:-frame]
    if (pixels.sum() - inner.sum()) / (pixels.size - inner.size) > 127.5:
        return ImageOps.invert(gray), True
    return gray, False


def download_mnist(data_dir: str | Path, splits: tuple[str, ...] = ALL_SPLITS) -> None:
    """Fetch the splits with torchvision into ``data_dir``/MNIST/raw, then verify them."""
    if misplaced := misplaced_mnist(data_dir):
        # Downloading here would nest a second MNIST/raw inside the user's copy.
        raise UsageError(f"not downloading into {raw_dir(data_dir)}: {misplaced}")
    try:
        for split in splits:
            datasets.MNIST(root=str(data_dir), train=split == "train", download=True)
    except (OSError, RuntimeError) as e:
        # torchvision lists every mirror it tried over several lines: fold them into one.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"downloading MNIST into {data_dir} failed: {reason[:500]}") from None
    verify_raw_files(data_dir, splits)


def prepare_raw_files(
    data_dir: str | Path, download: bool, splits: tuple[str, ...] = ALL_SPLITS
) -> None:
    """Make the raw files of ``splits`` usable: unpack ``.gz`` copies, download if allowed,
    verify."""
    folder = raw_dir(data_dir)
    for name in _split_files(splits):
        target, archive = folder / name, folder / f"{name}.gz"
        if target.exists() or not archive.exists():
            continue
        partial = target.with_name(target.name + ".partial")
        try:
            with gzip.open(archive, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
        except (OSError, EOFError) as e:
            partial.unlink(missing_ok=True)
            raise UsageError(f"cannot unpack {archive}: {e}") from None
    if download and any(not (folder / name).exists() for name in _split_files(splits)):
        download_mnist(data_dir, splits)
        return
    verify_raw_files(data_dir, splits)


def ensure_raw_files(
    accelerator: Accelerator, config: DataConfig, splits: tuple[str, ...] = ALL_SPLITS
) -> None:
    """``prepare_raw_files`` on the main process first, then on the others. A failure is raised
    after the rank's turn, so that no rank waits at the barrier for one that failed."""
    failure: UsageError | None = None
    download = config.download and accelerator.is_main_process  # only it may download
    with accelerator.main_process_first():
        try:
            prepare_raw_files(config.data_dir, download, splits)
        except UsageError as e:
            failure = e
    if failure is not None:
        raise failure


def misplaced_mnist(data_dir: str | Path) -> str | None:
    """What to do instead when ``data_dir``/MNIST/raw holds no MNIST file but ``data_dir`` or
    ``data_dir``/raw does; else None."""
    data_dir = Path(data_dir)
    for found in (raw_dir(data_dir), data_dir, data_dir / "raw"):
        if not any((found / n).exists() or (found / f"{n}.gz").exists() for n in EXPECTED_FILES):
            continue
        if found == raw_dir(data_dir):
            return None
        if found.name == "raw" and found.parent.name == "MNIST":
            return (
                f"{found} itself holds the MNIST files; pass the folder that contains MNIST/raw: "
                f"--data-dir {found.parent.parent}"
            )
        return (
            f"the MNIST files are in {found}, but mnist-dist reads them from <data-dir>/MNIST/raw: "
            f"move them into {raw_dir(data_dir)}"
        )
    return None


def _split_files(splits: tuple[str, ...]) -> list[str]:
    return [name for split in splits for name in SPLITS[split][:2]]


def verify_raw_files(data_dir: str | Path, splits: tuple[str, ...] = ALL_SPLITS) -> None:
    """Check that the IDX files of ``splits`` are there, and each one's header, size, shape and
    labels; md5 too for the full splits (torchvision checks only that they exist)."""
    folder = raw_dir(data_dir)
    missing = [name for name in _split_files(splits) if not (folder / name).exists()]
    if missing:
        hint = misplaced_mnist(data_dir) or (
            f"missing {', '.join(missing)}; "
            f"run `mnist-dist download --data-dir {data_dir}` or pass --download"
        )
        raise UsageError(f"MNIST not found in {folder}: {hint}")
    for images, labels, full_count in (SPLITS[split] for split in splits):
        n_images = _check_idx(folder / images, (IMAGE_SIZE, IMAGE_SIZE))
        n_labels = _check_idx(folder / labels, ())
        if n_images != n_labels:
            raise UsageError(
                f"{folder / images} holds {n_images} images but "
                f"{folder / labels} holds {n_labels} labels"
            )
        values = np.fromfile(folder / labels, dtype=np.uint8, offset=8)
        if values.size and values.max() > 9:
            bad = int(np.argmax(values > 9))
            raise UsageError(
                f"{folder / labels} is corrupt: label {values[bad]} at index {bad} "
                "(labels must be 0-9)"
            )
        if n_images == full_count:
            for name in (images, labels):
                data = (folder / name).read_bytes()
                actual, md5 = hashlib.md5(data, usedforsecurity=False).hexdigest(), _MD5[name]
                if actual != md5:
                    raise UsageError(
                        f"{folder / name} is corrupt: md5 {actual} differs from the published "
                        f"{md5}; delete it and run `mnist-dist download --data-dir {data_dir}`"
                    )


def _check_idx(path: Path, item_shape: tuple[int, ...]) -> int:
    """Validate one IDX file of unsigned bytes and return the number of items it holds."""
    magic = 0x800 + 1 + len(item_shape)  # IDX: 0x08 for unsigned bytes, then the dimensions
    header_len = 4 + 4 * (1 + len(item_shape))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(header_len)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if len(header) < header_len:
        raise UsageError(f"{path} is truncated: {size} bytes, shorter than its IDX header")
    fields = np.frombuffer(header, dtype=">u4")
    if fields[0] != magic:
        raise UsageError(
            f"{path} is not an MNIST IDX file: magic number {fields[0]}, expected {magic}"
        )
    count, dims = int(fields[1]), tuple(int(d) for d in fields[2:])
    if dims != item_shape:
        raise UsageError(f"{path} holds items of shape {dims}, expected {item_shape}")
    expected = header_len + count * math.prod(item_shape)
    if size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise UsageError(
            f"{path} is {state}: its header says {count} items ({expected} bytes), "
            f"the file has {size} bytes"
        )
    return count


class MNIST(datasets.MNIST):
    """torchvision's MNIST reader, needing only the two files of the split it reads. (Named as
    its base: torchvision names the data's folders, <root>/MNIST/raw, after the class.)"""

    def _check_exists(self) -> bool:
        files = _split_files(("train" if self.train else "test",))
        return all((raw_dir(self.root) / name).exists() for name in files)


def load_split(
    data_dir: str | Path, train: bool, transform: transforms.Compose | None = None
) -> datasets.MNIST:
    """torchvision's MNIST reader over already verified raw files (never downloads)."""
    return MNIST(root=str(data_dir), train=train, download=False, transform=transform)


def split_tensors(
    dataset: datasets.MNIST, limit: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_transform()`` of the first ``limit`` images at once, on ``device`` (on MNIST
    it is ``uint8 / 255``)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = dataset.data[:n].to(device).unsqueeze(1).float().div_(255)
    return images, dataset.targets[:n].to(device)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s shuffle, distinct for every seed and every epoch below 100,003."""
    return seed * 100_003 + epoch


@dataclass(frozen=True)
class Sharding:
    """One rank's share of every global batch of an epoch."""

    num_samples: int  # training images per epoch
    global_batch_size: int  # images per optimizer step, all ranks together
    world_size: int
    rank: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch_size)

    def global_batch_size_at(self, step: int) -> int:
        """Images in global batch ``step`` (the last batch of an epoch may be short)."""
        return min(self.global_batch_size, self.num_samples - step * self.global_batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of training images: the same on every rank and world size."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def rank_indices(self, epoch: int) -> list[torch.Tensor]:
        """This rank's image indices for every step of ``epoch``."""
        perm = self.permutation(epoch)
        batches = torch.split(perm, self.global_batch_size)
        return [torch.tensor_split(b, self.world_size)[self.rank] for b in batches]


class TensorTrainData:
    """The training split as one tensor on the training device; a batch is an index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sharding: Sharding) -> None:
        self.images, self.labels, self.sharding = images, labels, sharding

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from step ``start_step`` on (a resumed epoch)."""
        steps = self.sharding.rank_indices(epoch)[start_step:]
        if not steps:
            return
        # One host-to-device copy of the epoch's indices, not one per step.
        indices = torch.cat(steps).to(self.images.device, non_blocking=True)
        for idx in indices.split([len(s) for s in steps]):
            yield self.images[idx], self.labels[idx]


class LoaderTrainData(Sampler[list[int]]):
    """A standard DataLoader with the PIL transforms, fed by the same sharding: this is its
    batch sampler."""

    def __init__(
        self, dataset: datasets.MNIST, sharding: Sharding, num_workers: int, device: torch.device
    ) -> None:
        self.sharding, self.device, self.steps = sharding, device, []
        self.loader = DataLoader(
            dataset,
            batch_sampler=self,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from step ``start_step`` on (a resumed epoch)."""
        self.steps = self.sharding.rank_indices(epoch)[start_step:]
        for images, labels in self.loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


TrainData = TensorTrainData | LoaderTrainData


def _read_split(config: DataConfig, train: bool) -> tuple[datasets.MNIST, int]:
    """The split as the configured loader reads it, and how many of its images to use."""
    transform = reference_transform() if config.loader == "torchvision" else None
    dataset = load_split(config.data_dir, train=train, transform=transform)
    limit = config.max_train_samples if train else config.max_eval_samples
    return dataset, len(dataset) if limit is None else min(limit, len(dataset))


def build_train_data(
    config: DataConfig,
    global_batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    device: torch.device,
) -> TrainData:
    """This rank's training input: the first ``--max-train-samples`` images, sharded."""
    dataset, n = _read_split(config, train=True)
    sharding = Sharding(n, global_batch_size, world_size, rank, seed)
    if config.loader == "tensor":
        images, labels = split_tensors(dataset, n, device)
        return TensorTrainData(images, labels, sharding)
    return LoaderTrainData(dataset, sharding, config.num_workers, device)


def eval_batches(
    config: DataConfig, world_size: int, rank: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]] | DataLoader:
    """This rank's contiguous shard of the test split, in batches (no padding, no duplicates)."""
    dataset, n = _read_split(config, train=False)
    shard = torch.tensor_split(torch.arange(n), world_size)[rank]
    batch_size = config.eval_batch_size
    if config.loader == "tensor":
        images, labels = split_tensors(dataset, n, device)
        images, labels = images[shard], labels[shard]
        return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))
    return DataLoader(
        Subset(dataset, shard.tolist()),
        batch_size=batch_size,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
