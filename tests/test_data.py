from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gzip_file, make_tiny_mnist, write_idx

from mnist_dist.config import DataConfig
from mnist_dist.data import (
    LoaderTrainData,
    Sharding,
    TensorTrainData,
    build_train_data,
    eval_batches,
    load_split,
    prepare_raw_files,
    raw_dir,
    reference_transform,
    split_tensors,
)
from mnist_dist.errors import UsageError


def test_reads_a_small_idx_dataset_with_the_real_reader(tiny_mnist):
    prepare_raw_files(tiny_mnist, download=False)
    train = load_split(tiny_mnist, train=True)
    assert len(train) == 256 and train.data.shape == (256, 28, 28)
    images, labels = split_tensors(train, None, torch.device("cpu"))
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() == 1.0
    assert labels.max() <= 9


def test_missing_data_names_the_folder_the_files_and_the_download_command(tmp_path):
    with pytest.raises(UsageError) as info:
        prepare_raw_files(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(raw_dir(tmp_path / "nowhere")) in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert message.count(name) == 1, message  # each missing file named once
    assert "mnist-dist download --data-dir" in message
    assert "\n" not in message


def test_only_the_missing_files_are_named(tiny_mnist):
    (raw_dir(tiny_mnist) / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UsageError) as info:
        prepare_raw_files(tiny_mnist, download=False)
    message = str(info.value)
    assert "missing t10k-labels-idx1-ubyte;" in message
    assert "train-images-idx3-ubyte" not in message


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("given", ["MNIST/raw", "MNIST"])
def test_a_data_dir_inside_mnist_raw_names_the_folder_to_pass(tiny_mnist, given, download):
    # --data-dir ./data/MNIST/raw or ./data/MNIST: the files are right there, and a download
    # would nest a second MNIST/raw inside them.
    with pytest.raises(UsageError) as info:
        prepare_raw_files(tiny_mnist / given, download=download)
    message = str(info.value)
    assert f"pass the folder that contains MNIST/raw: --data-dir {tiny_mnist}" in message
    assert "mnist-dist download" not in message
    assert not (tiny_mnist / given / "MNIST").exists()


def test_loose_files_say_where_they_belong(tiny_mnist, tmp_path):
    loose = tmp_path / "loose"
    raw_dir(tiny_mnist).rename(loose)
    with pytest.raises(UsageError) as info:
        prepare_raw_files(loose, download=False)
    assert f"the MNIST files are in {loose}" in str(info.value)
    assert f"move them into {raw_dir(loose)}" in str(info.value)


def test_the_test_split_alone_is_enough_to_read_it(tiny_mnist):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw_dir(tiny_mnist) / name).unlink()
    prepare_raw_files(tiny_mnist, download=False, splits=("test",))
    assert len(load_split(tiny_mnist, train=False)) == 128
    with pytest.raises(UsageError, match="missing train-images-idx3-ubyte, train-labels"):
        prepare_raw_files(tiny_mnist, download=False)


def test_gz_archives_are_unpacked_when_the_raw_files_are_missing(tiny_mnist):
    raw = raw_dir(tiny_mnist)
    for f in list(raw.iterdir()):
        gzip_file(f)
        f.unlink()
    prepare_raw_files(tiny_mnist, download=False)
    assert len(load_split(tiny_mnist, train=False)) == 128


def _corrupt(raw: Path, kind: str) -> str:
    labels = raw / "train-labels-idx1-ubyte"
    images = raw / "t10k-images-idx3-ubyte"
    if kind == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return "is truncated"
    if kind == "header-only":
        images.write_bytes(images.read_bytes()[:10])
        return "shorter than its IDX header"
    if kind == "magic":
        data = bytearray(labels.read_bytes())
        data[2] = 0x09  # 0x0801 -> 0x0901
        labels.write_bytes(bytes(data))
        return "magic number"
    if kind == "label":
        data = bytearray(labels.read_bytes())
        data[8 + 5] = 42
        labels.write_bytes(bytes(data))
        return "label 42 at index 5"
    if kind == "shape":
        write_idx(images, np.zeros((128, 32, 32), np.uint8), 2051)
        return "shape (32, 32)"
    if kind == "count-mismatch":
        write_idx(labels, np.zeros(100, np.uint8), 2049)
        return "holds 256 images but"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "header-only", "magic", "label", "shape", "count-mismatch"]
)
def test_corrupt_files_are_rejected_with_one_line(tiny_mnist, kind):
    expected = _corrupt(raw_dir(tiny_mnist), kind)
    with pytest.raises(UsageError) as info:
        prepare_raw_files(tiny_mnist, download=False)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_full_size_split_must_match_the_published_checksum(tmp_path):
    # 10,000 test images claim the full split, so their md5 is checked: zeros do not match.
    root = make_tiny_mnist(tmp_path / "d")
    raw = raw_dir(root)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((10_000, 28, 28), np.uint8), 2051)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(10_000, np.uint8), 2049)
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte is corrupt: md5"):
        prepare_raw_files(root, download=False)


def test_real_mnist_passes_verification(mnist_dir):
    prepare_raw_files(mnist_dir, download=False)


def test_tensor_preprocessing_equals_the_reference_transform(mnist_dir):
    test = load_split(mnist_dir, train=False)
    images, labels = split_tensors(test, None, torch.device("cpu"))
    pil_path = load_split(mnist_dir, train=False, transform=reference_transform())
    for i in range(0, len(test), 97):  # ~100 images across the split, bit for bit
        image, label = pil_path[i]
        assert torch.equal(image, images[i]) and label == labels[i]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_samples, batch", [(640, 64), (1000, 64), (130, 64), (65, 8)])
def test_ranks_together_see_every_sample_once_per_epoch(world_size, num_samples, batch):
    shards = [Sharding(num_samples, batch, world_size, r, seed=3) for r in range(world_size)]
    for epoch in (1, 2):
        per_rank = [torch.cat(s.rank_indices(epoch)) for s in shards]
        seen = torch.cat(per_rank)
        assert len(seen) == num_samples
        assert torch.equal(seen.sort().values, torch.arange(num_samples))
    # The epoch's order is independent of the world size and differs between epochs.
    assert torch.equal(
        shards[0].permutation(1), Sharding(num_samples, batch, 1, 0, 3).permutation(1)
    )
    assert not torch.equal(shards[0].permutation(1), shards[0].permutation(2))


def test_global_batches_do_not_depend_on_world_size():
    one = Sharding(1000, 64, 1, 0, seed=0).rank_indices(1)
    two = [Sharding(1000, 64, 2, r, seed=0).rank_indices(1) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert torch.equal(batch, torch.cat([two[0][step], two[1][step]]))


class _IndexDataset(torch.utils.data.Dataset):
    """Each item is its own index, so a pipeline's output says which samples it served."""

    def __len__(self) -> int:
        return 200

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i


def test_both_pipelines_on_two_ranks_visit_each_sample_exactly_once():
    cpu = torch.device("cpu")
    ids = torch.arange(200)
    seen = {"tensor": [], "torchvision": []}
    for rank in (0, 1):
        sharding = Sharding(200, 32, 2, rank, seed=7)
        tensor_data = TensorTrainData(ids.float().view(-1, 1), ids, sharding)
        loader_data = LoaderTrainData(_IndexDataset(), sharding, num_workers=0, device=cpu)
        seen["tensor"] += [y for _, y in tensor_data.epoch(5)]
        seen["torchvision"] += [y for _, y in loader_data.epoch(5)]
    for batches in seen.values():
        assert torch.equal(torch.cat(batches).sort().values, ids)
    # Same samples, same order, batch by batch.
    assert all(torch.equal(a, b) for a, b in zip(seen["tensor"], seen["torchvision"], strict=True))


def test_tensor_and_torchvision_pipelines_yield_identical_batches(tiny_mnist):
    cpu = torch.device("cpu")
    kwargs = dict(global_batch_size=64, world_size=2, rank=1, seed=0, device=cpu)
    tensor = build_train_data(DataConfig(str(tiny_mnist), "tensor", num_workers=0), **kwargs)
    loader = build_train_data(DataConfig(str(tiny_mnist), "torchvision", num_workers=0), **kwargs)
    for (xa, ya), (xb, yb) in zip(tensor.epoch(1), loader.epoch(1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_shards_cover_the_test_split_exactly_once(tiny_mnist):
    cpu = torch.device("cpu")
    labels = []
    for rank in range(3):
        batches = eval_batches(DataConfig(str(tiny_mnist), eval_batch_size=50), 3, rank, cpu)
        labels += [y for _, y in batches]
    assert torch.equal(torch.cat(labels), load_split(tiny_mnist, train=False).targets)
