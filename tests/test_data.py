"""The Fashion-MNIST IDX reader, on small files written here and on the installed dataset."""

import gzip
import struct

import numpy as np
import pytest
import torch

from convcov_fast import data

REAL_DATA = data.DEFAULT_DATA_DIR
needs_real_data = pytest.mark.skipif(
    not all((REAL_DATA / name).is_file() for names in data.FILES.values() for name in names),
    reason=f"Fashion-MNIST is not installed in {REAL_DATA} (apt-get install dataset-fashion-mnist)",
)


def idx_bytes(array, *, magic=None):
    """Encode a uint8 array as IDX: magic number, big-endian uint32 dimensions, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = bytes([0, 0, data.UBYTE_TYPE_CODE, array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return magic + dims + array.tobytes()


def write_gz(path, payload):
    with gzip.open(path, "wb") as file:
        file.write(payload)


def write_split(folder, split, images, labels):
    image_name, label_name = data.FILES[split]
    write_gz(folder / image_name, idx_bytes(images))
    write_gz(folder / label_name, idx_bytes(labels))


def random_split(rng, count):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % data.NUM_CLASSES
    rng.shuffle(labels)
    return images, labels


@pytest.fixture
def small_dataset(tmp_path):
    """A folder with a 100-image training split and a 30-image test split of random pixels."""
    rng = np.random.default_rng(0)
    train = random_split(rng, 100)
    test = random_split(rng, 30)
    write_split(tmp_path, "train", *train)
    write_split(tmp_path, "test", *test)
    return tmp_path, train, test


def test_read_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / "images.gz"
    write_gz(path, idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(path, ndim=3), array)


def test_read_split_round_trip(small_dataset):
    folder, (train_images, train_labels), _ = small_dataset
    images, labels = data.read_split(folder, "train")
    np.testing.assert_array_equal(images, train_images)
    np.testing.assert_array_equal(labels, train_labels)


def test_load_normalizes_images(small_dataset):
    folder, (train_images, train_labels), (test_images, _) = small_dataset
    dataset = data.load_fashion_mnist(folder)
    assert dataset.train.images.shape == (100, 1, 28, 28)
    assert dataset.train.images.dtype == torch.float32
    assert dataset.train.labels.dtype == torch.int64
    assert dataset.test.images.shape == (30, 1, 28, 28)
    assert len(dataset.val) == 0
    expected = (train_images.astype(np.float64) / 255 - data.TRAIN_MEAN) / data.TRAIN_STD
    np.testing.assert_allclose(dataset.train.images[:, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(dataset.train.labels.numpy(), train_labels)
    expected_test = (test_images.astype(np.float64) / 255 - data.TRAIN_MEAN) / data.TRAIN_STD
    np.testing.assert_allclose(dataset.test.images[:, 0].numpy(), expected_test, atol=1e-5)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    # Type code 0x0D is float32, which Fashion-MNIST never uses.
    write_gz(path, idx_bytes(np.zeros(5), magic=bytes([0, 0, 0x0D, 1])))
    with pytest.raises(data.IDXFormatError, match="magic number 0x00000d01") as info:
        data.read_idx(path, ndim=1)
    assert str(path) in str(info.value)


def test_read_idx_wrong_ndim(tmp_path):
    path = tmp_path / "images.gz"
    write_gz(path, idx_bytes(np.zeros((4, 28, 28))))
    with pytest.raises(data.IDXFormatError, match="expected 0x00000801"):
        data.read_idx(path, ndim=1)


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "images.gz"
    payload = idx_bytes(np.ones((4, 28, 28)))
    write_gz(path, payload[:-10])
    with pytest.raises(data.IDXFormatError, match="truncated") as info:
        data.read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "images.gz"
    write_gz(path, bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(data.IDXFormatError, match="shorter than the 16-byte IDX header"):
        data.read_idx(path, ndim=3)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "labels.gz"
    write_gz(path, idx_bytes(np.ones(6)) + b"\x01\x02")
    with pytest.raises(data.IDXFormatError, match="longer than its header states"):
        data.read_idx(path, ndim=1)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "images.gz"
    write_gz(path, idx_bytes(np.ones((4, 28, 28))))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.IDXFormatError, match="not a valid gzip file") as info:
        data.read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(idx_bytes(np.ones((4, 28, 28))))
    with pytest.raises(data.IDXFormatError, match="not a valid gzip file"):
        data.read_idx(path, ndim=3)


def test_read_split_count_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    images, labels = random_split(rng, 20)
    write_split(tmp_path, "test", images, labels[:19])
    with pytest.raises(data.IDXFormatError, match="20 images but .* 19 labels"):
        data.read_split(tmp_path, "test")


def test_read_split_label_out_of_range(tmp_path):
    rng = np.random.default_rng(3)
    images, labels = random_split(rng, 20)
    labels[4] = 10
    write_split(tmp_path, "test", images, labels)
    with pytest.raises(data.IDXFormatError, match="contains label 10") as info:
        data.read_split(tmp_path, "test")
    assert data.FILES["test"][1] in str(info.value)


def test_read_split_wrong_image_size(tmp_path):
    image_name, label_name = data.FILES["test"]
    write_gz(tmp_path / image_name, idx_bytes(np.zeros((3, 32, 32))))
    write_gz(tmp_path / label_name, idx_bytes(np.zeros(3)))
    with pytest.raises(data.IDXFormatError, match=r"size \(32, 32\), expected \(28, 28\)"):
        data.read_split(tmp_path, "test")


def test_missing_folder_error_explains_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_fashion_mnist(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get update && apt-get install dataset-fashion-mnist" in message
    assert "--data DIR" in message


def test_missing_label_file_is_named(small_dataset):
    folder, _, _ = small_dataset
    (folder / data.FILES["test"][1]).unlink()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.read_split(folder, "test")
    assert data.FILES["test"][1] in str(info.value)
    assert data.FILES["test"][0] not in str(info.value)


def test_subsets_are_disjoint_and_balanced(small_dataset):
    folder, (train_images, _), _ = small_dataset
    dataset = data.load_fashion_mnist(folder, train_subset=40, val_size=20, test_subset=10, seed=5)
    assert len(dataset.train) == 40
    assert len(dataset.val) == 20
    assert len(dataset.test) == 10
    assert torch.bincount(dataset.train.labels, minlength=10).tolist() == [4] * 10
    assert torch.bincount(dataset.val.labels, minlength=10).tolist() == [2] * 10
    assert torch.bincount(dataset.test.labels, minlength=10).tolist() == [1] * 10

    # Every image of the random fixture is distinct, so equal rows mean the same image.
    train_rows = {row.numpy().tobytes() for row in dataset.train.images}
    val_rows = {row.numpy().tobytes() for row in dataset.val.images}
    assert len(train_rows) == 40
    assert len(val_rows) == 20
    assert not train_rows & val_rows


def test_subsets_follow_seed(small_dataset):
    folder, _, _ = small_dataset
    first = data.load_fashion_mnist(folder, train_subset=30, val_size=10, seed=1)
    again = data.load_fashion_mnist(folder, train_subset=30, val_size=10, seed=1)
    other = data.load_fashion_mnist(folder, train_subset=30, val_size=10, seed=2)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.val.images, again.val.images)
    assert not torch.equal(first.train.images, other.train.images)


def test_val_split_without_subset_uses_rest(small_dataset):
    folder, _, _ = small_dataset
    dataset = data.load_fashion_mnist(folder, val_size=30)
    assert len(dataset.val) == 30
    assert len(dataset.train) == 70


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"train_subset": 90, "val_size": 20}, "need more than the 100 training images"),
        ({"val_size": 100}, "need more than the 100 training images"),
        ({"test_subset": 31}, "exceeds the 30 test images"),
        ({"train_subset": -1}, "train_subset must be a non-negative int"),
        ({"val_size": 2.5}, "val_size must be a non-negative int"),
    ],
)
def test_invalid_sizes_rejected(small_dataset, sizes, match):
    folder, _, _ = small_dataset
    with pytest.raises(ValueError, match=match):
        data.load_fashion_mnist(folder, **sizes)


def test_stratified_order_prefixes_balanced():
    labels = torch.arange(60) % 3
    order = data.stratified_order(labels, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(60))
    for prefix in (3, 9, 30):
        counts = torch.bincount(labels[order[:prefix]], minlength=3)
        assert counts.tolist() == [prefix // 3] * 3


@needs_real_data
def test_real_files_shapes_and_labels():
    train_images, train_labels = data.read_split(REAL_DATA, "train")
    test_images, test_labels = data.read_split(REAL_DATA, "test")
    assert train_images.shape == (60000, 28, 28)
    assert train_labels.shape == (60000,)
    assert test_images.shape == (10000, 28, 28)
    assert test_labels.shape == (10000,)
    # Both Fashion-MNIST splits are balanced: 6,000 and 1,000 images per class.
    assert np.bincount(train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test_labels, minlength=10).tolist() == [1000] * 10
    assert train_images.max() > 0
    assert test_images.max() > 0
    assert (train_images.reshape(60000, -1).max(axis=1) > 0).all()


@needs_real_data
def test_real_files_match_normalization_constants():
    train_images, _ = data.read_split(REAL_DATA, "train")
    pixels = train_images.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(data.TRAIN_MEAN, abs=1e-6)
    assert pixels.std() == pytest.approx(data.TRAIN_STD, abs=1e-6)
