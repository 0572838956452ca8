"""Fashion-MNIST from its IDX .gz files, as normalized tensors.

An IDX file starts with a 4-byte magic number: two zero bytes, a type code (0x08 for unsigned
bytes, the only type Fashion-MNIST uses) and the number of dimensions. Each dimension follows as
a big-endian uint32, then the data in row-major order. Images are (N, 28, 28), labels are (N,).
"""

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

INSTALL_HINT = (
    "install the dataset with `apt-get update && apt-get install dataset-fashion-mnist`, "
    "or pass the folder that contains the files with --data DIR"
)

IMAGE_SIZE = 28
NUM_CLASSES = 10
UBYTE_TYPE_CODE = 0x08

# Mean and standard deviation of all 60,000 training images after scaling pixels to [0, 1],
# computed in float64 from train-images-idx3-ubyte.gz. tests/test_data.py recomputes them.
TRAIN_MEAN = 0.2860406
TRAIN_STD = 0.3530242

# A black pixel after normalization, the value that padding of a normalized image should use.
BACKGROUND = (0.0 - TRAIN_MEAN) / TRAIN_STD


class DatasetNotFoundError(FileNotFoundError):
    """A Fashion-MNIST file is missing from the data folder."""


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt or does not match its companion file."""


@dataclass(frozen=True)
class Split:
    """Normalized float32 images of shape (N, 1, 28, 28) and int64 labels of shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return self.labels.shape[0]


@dataclass(frozen=True)
class FashionMNIST:
    """Training, validation and test splits.

    The validation split is carved from the 60,000 training images and is disjoint from the
    training split. It is empty unless a validation size was requested.
    """

    train: Split
    val: Split
    test: Split


def read_idx(path, *, ndim):
    """Read an unsigned-byte IDX .gz file and return its contents as a uint8 array.

    Raises:
        DatasetNotFoundError: the file does not exist.
        IDXFormatError: the gzip stream is corrupt, the magic number is not an unsigned-byte
            array of ``ndim`` dimensions, or the data size disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Fashion-MNIST file not found: {path}; {INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise IDXFormatError(
            f"{path} is not a valid gzip file ({error}); the download may be truncated, "
            f"reinstall it: {INSTALL_HINT}"
        ) from error

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IDXFormatError(
            f"{path} is truncated: {len(raw)} bytes is shorter than the {header_size}-byte "
            f"IDX header of a {ndim}-D array"
        )
    magic = raw[:4]
    expected_magic = bytes([0, 0, UBYTE_TYPE_CODE, ndim])
    if magic != expected_magic:
        raise IDXFormatError(
            f"{path} has magic number 0x{magic.hex()}, expected 0x{expected_magic.hex()} "
            f"(an unsigned-byte IDX array with {ndim} dimensions)"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_bytes:
        state = "truncated" if len(raw) < expected_bytes else "longer than its header states"
        raise IDXFormatError(
            f"{path} is {state}: the header declares shape {shape}, which needs "
            f"{expected_bytes} bytes, but the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def read_split(data_dir, split):
    """Read and validate the ``"train"`` or ``"test"`` split as uint8 images and labels.

    Returns:
        images of shape (N, 28, 28) and labels of shape (N,), both uint8 numpy arrays.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    data_dir = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    image_path, label_path = (data_dir / name for name in FILES[split])
    missing = [path.name for path in (image_path, label_path) if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found in {data_dir}: missing "
            f"{', '.join(missing)}; {INSTALL_HINT}"
        )

    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IDXFormatError(
            f"{image_path} contains images of size {images.shape[1:]}, expected "
            f"({IMAGE_SIZE}, {IMAGE_SIZE})"
        )
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{image_path} contains {images.shape[0]} images but {label_path} contains "
            f"{labels.shape[0]} labels; the two files must come from the same release"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IDXFormatError(
            f"{label_path} contains label {int(labels.max())}, expected labels in "
            f"0..{NUM_CLASSES - 1}"
        )
    return images, labels


def normalize(images):
    """Scale uint8 images of shape (N, 28, 28) to a float32 tensor of shape (N, 1, 28, 28).

    Pixels are divided by 255, then standardized with the training-set ``TRAIN_MEAN`` and
    ``TRAIN_STD``, so the test split uses the training statistics too.
    """
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:
        # torch.from_numpy warns about read-only arrays such as those of read_idx.
        images = images.copy()
    pixels = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return pixels.sub_(TRAIN_MEAN).div_(TRAIN_STD).unsqueeze(1)


def stratified_order(labels, generator):
    """Return a permutation of ``range(len(labels))`` whose every prefix is class-balanced.

    The indices are shuffled with ``generator``, then stably sorted by their rank within their
    own class. Any prefix of length n therefore contains floor(n / classes) or one more of every
    class that has enough examples.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    permutation = torch.randperm(labels.shape[0], generator=generator)
    shuffled = labels[permutation]
    rank = torch.empty_like(shuffled)
    for label in torch.unique(shuffled):
        members = (shuffled == label).nonzero().squeeze(1)
        rank[members] = torch.arange(members.shape[0])
    return permutation[torch.sort(rank, stable=True).indices]


def _take(images, labels, indices):
    indices = indices.numpy()
    return Split(normalize(images[indices]), torch.from_numpy(labels[indices].astype(np.int64)))


def load_fashion_mnist(data_dir=None, *, train_subset=0, val_size=0, test_subset=0, seed=0):
    """Load Fashion-MNIST as normalized tensors, with optional subsets and a validation split.

    Args:
        data_dir: folder with the four IDX .gz files; None uses ``DEFAULT_DATA_DIR``.
        train_subset: number of training images to keep, 0 for all that remain after the
            validation split.
        val_size: number of training images held out as the validation split, 0 for none.
            Hyperparameters should be chosen on this split, never on the test split.
        test_subset: number of test images to keep, 0 for all 10,000.
        seed: seed of the class-stratified selection of the subsets and the validation split.

    Raises:
        DatasetNotFoundError: a file is missing. The message names the folder and how to
            install the files.
        IDXFormatError: a file is truncated or corrupt.
        ValueError: a size is negative or larger than the split it is taken from.
    """
    for name, value in (("train_subset", train_subset), ("val_size", val_size),
                        ("test_subset", test_subset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    train_images, train_labels = read_split(data_dir, "train")
    test_images, test_labels = read_split(data_dir, "test")
    total_train = train_labels.shape[0]
    if val_size + train_subset > total_train or val_size >= total_train:
        raise ValueError(
            f"val_size={val_size} and train_subset={train_subset} need more than the "
            f"{total_train} training images; reduce one of them"
        )
    if test_subset > test_labels.shape[0]:
        raise ValueError(
            f"test_subset={test_subset} exceeds the {test_labels.shape[0]} test images; "
            "use 0 for the full test split"
        )

    generator = torch.Generator().manual_seed(seed)
    order = stratified_order(torch.from_numpy(train_labels.astype(np.int64)), generator)
    val_indices = order[:val_size]
    train_end = total_train if train_subset == 0 else val_size + train_subset
    # Keep the full training split in file order, so seeds change only what a subset selects.
    train_indices = order[val_size:train_end]
    if train_subset == 0 and val_size == 0:
        train_indices = torch.arange(total_train)

    if test_subset:
        test_order = stratified_order(torch.from_numpy(test_labels.astype(np.int64)), generator)
        test_indices = test_order[:test_subset]
    else:
        test_indices = torch.arange(test_labels.shape[0])

    return FashionMNIST(
        train=_take(train_images, train_labels, train_indices),
        val=_take(train_images, train_labels, val_indices),
        test=_take(test_images, test_labels, test_indices),
    )
