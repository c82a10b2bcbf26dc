"""MNIST on disk, the reference preprocessing, and the two input pipelines.

Both pipelines shard the same way: each epoch draws one seeded permutation of the training set
(identical on every rank), cuts it into global batches of ``global_batch_size`` and gives each
rank a contiguous slice of every global batch. So the global batches, and therefore the results,
do not depend on the world size or on which pipeline is used, and across ranks every training
image is seen exactly once per epoch. We shard ourselves and never ``prepare`` a DataLoader
(double sharding: huggingface/accelerate#4075).
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
_IMAGE_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
_LABEL_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension


@dataclass(frozen=True)
class _SplitFiles:
    images: str
    labels: str
    full_count: int


SPLITS = {
    "train": _SplitFiles("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": _SplitFiles("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
# The published md5 of each uncompressed file, checked when it claims the full split.
_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
EXPECTED_FILES = [name for s in SPLITS.values() for name in (s.images, s.labels)]
ALL_SPLITS = ("train", "test")  # what training reads; evaluation reads only "test"


def raw_dir(data_dir: str | Path) -> Path:
    """Where torchvision's MNIST reader looks for the IDX files."""
    return Path(data_dir) / "MNIST" / "raw"


def reference_transform() -> transforms.Compose:
    """The reference preprocessing: pixels in [0, 1], no normalisation."""
    return transforms.Compose(
        [
            transforms.Grayscale(num_output_channels=1),
            transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)),
            transforms.ToTensor(),
        ]
    )


def as_light_on_dark(image: Image.Image) -> tuple[Image.Image, bool]:
    """``image`` in grayscale with MNIST's polarity, light strokes on a dark background, and
    whether it had to be inverted for that. The border is taken for the background (a digit is
    drawn or cropped inside its image): a border brighter on average than mid-grey is a light
    background, such as a photo or scan of a digit written on paper."""
    gray = image.convert("L")
    pixels = np.asarray(gray, dtype=np.float64)
    frame = max(1, min(pixels.shape) // 10)  # the outer tenth of the shorter side
    inner = pixels[frame:-frame, frame:-frame]
    if (pixels.sum() - inner.sum()) / (pixels.size - inner.size) > 127.5:
        return ImageOps.invert(gray), True
    return gray, False


def download_mnist(data_dir: str | Path, splits: tuple[str, ...] = ALL_SPLITS) -> None:
    """Fetch the splits with torchvision into ``data_dir``/MNIST/raw, then verify them."""
    misplaced = misplaced_mnist(data_dir)
    if misplaced:
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
    verify. Files of other splits are neither needed nor checked."""
    folder = raw_dir(data_dir)
    for name in _split_files(splits):
        target, archive = folder / name, folder / f"{name}.gz"
        if not target.exists() and archive.exists():
            _gunzip(archive, target)
    if download and any(not (folder / name).exists() for name in _split_files(splits)):
        download_mnist(data_dir, splits)
        return
    verify_raw_files(data_dir, splits)


def ensure_raw_files(
    accelerator: Accelerator, config: DataConfig, splits: tuple[str, ...] = ALL_SPLITS
) -> None:
    """``prepare_raw_files`` on the main process first, then on the other ranks, which find the
    files in place and verify them. Missing or damaged files raise the same one-line error on
    every rank: each rank first leaves its turn, so that none waits at the barrier for a rank
    that has failed."""
    failure: UsageError | None = None
    with accelerator.main_process_first():
        try:
            download = config.download and accelerator.is_main_process  # only it may download
            prepare_raw_files(config.data_dir, download, splits)
        except UsageError as e:
            failure = e
    if failure is not None:
        raise failure


def misplaced_mnist(data_dir: str | Path) -> str | None:
    """What to do instead, when ``data_dir`` is not the folder that holds MNIST/raw but the
    MNIST files are right there: ``data_dir`` is itself ``MNIST/raw`` (or ``MNIST``), or holds
    the files loose. None when ``data_dir``/MNIST/raw holds any of them (or nothing is near)."""
    data_dir = Path(data_dir)
    if _holds_mnist_files(raw_dir(data_dir)):
        return None
    for found in (data_dir, data_dir / "raw"):
        if not _holds_mnist_files(found):
            continue
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


def _holds_mnist_files(folder: Path) -> bool:
    return any((folder / n).exists() or (folder / f"{n}.gz").exists() for n in EXPECTED_FILES)


def _split_files(splits: tuple[str, ...]) -> list[str]:
    return [name for split in splits for name in (SPLITS[split].images, SPLITS[split].labels)]


def _gunzip(archive: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with gzip.open(archive, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)
    except (OSError, EOFError) as e:
        partial.unlink(missing_ok=True)
        raise UsageError(f"cannot unpack {archive}: {e}") from None


def verify_raw_files(data_dir: str | Path, splits: tuple[str, ...] = ALL_SPLITS) -> None:
    """Check that the IDX files of ``splits`` are there, and each one's header, size, shape and
    labels; md5 too for the full splits. (torchvision only checks that they exist: a flipped
    byte would load silently, a truncated file fail with a reshape error deep in its reader.)"""
    folder = raw_dir(data_dir)
    missing = [name for name in _split_files(splits) if not (folder / name).exists()]
    if missing:
        misplaced = misplaced_mnist(data_dir)
        if misplaced:
            raise UsageError(f"MNIST not found in {folder}: {misplaced}")
        raise UsageError(
            f"MNIST not found in {folder}: missing {', '.join(missing)}; "
            f"run `mnist-dist download --data-dir {data_dir}` or pass --download"
        )
    for split in (SPLITS[name] for name in splits):
        n_images = _check_idx(folder / split.images, _IMAGE_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
        n_labels = _check_idx(folder / split.labels, _LABEL_MAGIC, ())
        if n_images != n_labels:
            raise UsageError(
                f"{folder / split.images} holds {n_images} images but "
                f"{folder / split.labels} holds {n_labels} labels"
            )
        labels = np.fromfile(folder / split.labels, dtype=np.uint8, offset=8)
        if labels.size and labels.max() > 9:
            bad = int(np.argmax(labels > 9))
            raise UsageError(
                f"{folder / split.labels} is corrupt: label {labels[bad]} at index {bad} "
                "(labels must be 0-9)"
            )
        if n_images == split.full_count:
            for name in (split.images, split.labels):
                actual, md5 = _md5(folder / name), _MD5[name]
                if actual != md5:
                    raise UsageError(
                        f"{folder / name} is corrupt: md5 {actual} differs from the published "
                        f"{md5}; delete it and run `mnist-dist download --data-dir {data_dir}`"
                    )


def _check_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> int:
    """Validate one IDX file and return the number of items it holds."""
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


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _SplitReader(datasets.MNIST):
    """torchvision's MNIST reader, needing only the two files of the split it reads (its own
    check wants all four, so a copy with only the test files would be "not found")."""

    @property
    def raw_folder(self) -> str:  # torchvision derives it from the class name
        return str(raw_dir(self.root))

    @property
    def processed_folder(self) -> str:
        return str(Path(self.root) / "MNIST" / "processed")

    def _check_exists(self) -> bool:
        split = SPLITS["train" if self.train else "test"]
        return all((raw_dir(self.root) / name).exists() for name in (split.images, split.labels))


def load_split(
    data_dir: str | Path, train: bool, transform: transforms.Compose | None = None
) -> datasets.MNIST:
    """torchvision's MNIST reader over already verified raw files (never downloads)."""
    return _SplitReader(root=str(data_dir), train=train, download=False, transform=transform)


def split_tensors(
    dataset: datasets.MNIST, limit: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference preprocessing applied to a whole split at once, resident on ``device``:
    Grayscale and Resize(28x28) are identities on MNIST and ToTensor is ``uint8 / 255``, so this
    equals ``reference_transform()`` image for image (a test checks)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = dataset.data[:n].to(device).unsqueeze(1).float().div_(255)
    return images, dataset.targets[:n].to(device)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s shuffle in a run seeded with ``seed``: a different one for every
    seed and every epoch below 100,003, so no two runs or epochs share an order by accident."""
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
        """This rank's image indices for every step of ``epoch`` (contiguous slices, sizes
        differing by at most one when a short last batch does not split evenly)."""
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


class _RankBatchSampler(Sampler[list[int]]):
    def __init__(self, sharding: Sharding) -> None:
        self.sharding, self.epoch, self.start_step = sharding, 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        steps = self.sharding.rank_indices(self.epoch)[self.start_step :]
        return (idx.tolist() for idx in steps)

    def __len__(self) -> int:
        return self.sharding.steps_per_epoch - self.start_step


class LoaderTrainData:
    """A standard DataLoader with the PIL transforms, fed by the same sharding."""

    def __init__(
        self, dataset: datasets.MNIST, sharding: Sharding, num_workers: int, device: torch.device
    ) -> None:
        self.sharding = sharding
        self.sampler, self.device = _RankBatchSampler(sharding), device
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from step ``start_step`` on (a resumed epoch)."""
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        for images, labels in self.loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


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
