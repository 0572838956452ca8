"""Study of depthwise filter initializations of ConvMixer on Fashion-MNIST.

Four initializations ("arms") of the depthwise filters are compared, each with the filters
trained from their initial values ("trainable") and kept fixed ("frozen"):

- ``default``: PyTorch's uniform init of ``nn.Conv2d``.
- ``closed_form``: ``covariance.closed_form`` with (sigma_first, sigma_last, constant) chosen by
  a grid search on the validation split, which is carved from the training images.
- ``learned``: the covariances of a small ConvMixer trained briefly, whose depth and kernel size
  differ from the target's, transferred with ``covariance.resize`` and
  ``covariance.interpolate_depth``.
- ``fitted``: one ``covariance.gaussian`` per layer, with sigma and constant fitted by least
  squares to the learned covariance of that layer.

Every covariance bank is scaled to the per-weight variance of PyTorch's default init
(``covariance.default_variance``), so the arms differ in the structure of the filters, not in
their scale. All runs share one data split, and seed ``s`` gives every arm the same weights
outside the depthwise filters and the same batch order.

Results are cached in the output folder as one JSON file per run, and the source bank as a
``covariance.save_bank`` file, so a rerun trains only what is missing.
"""

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import _checks, covariance, data, models, plots, sampling, train  # noqa: E402

INITS = ("default", "closed_form", "learned", "fitted")
DEPTHWISE_KINDS = models.DEPTHWISE_KINDS

STUDY_FILE = "study.json"
SOURCE_BANK_FILE = "source_bank.pt"
SOURCE_RUN_FILE = "source_run.json"
RUNS_DIR = "runs"
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
CURVES_FILE = "curves.png"
SOURCE_FIGURE = "source_bank.png"

# The fit searches sigma on a log grid over this range (in taps) and refines the best point with
# a golden-section search. Below 0.1 the Gaussian part is the identity to within exp(-50).
FIT_SIGMA_RANGE = (0.1, 30.0)
FIT_GRID_POINTS = 121
FIT_REFINE_STEPS = 40
# Fitted constants are clipped to [0, FIT_MAX_CONSTANT]: ``covariance.gaussian`` needs c < 1, and
# c near 1 leaves a nearly rank-one matrix.
FIT_MAX_CONSTANT = 0.99

# Sampled filters drawn per layer in the filter figures, and the resolution of every figure,
# which keeps the PNGs of 9 x 9 banks under about 300 KB.
FIGURE_FILTERS = 6
FIGURE_DPI = 72

# (sigma_first, sigma_last, constant) chosen by eye from the shape of learned ConvMixer filters,
# the closed-form defaults before any measurement. Every grid contains it as a reference.
EYEBALLED_POINT = (0.75, 2.5, 0.0)


@dataclass(frozen=True)
class StudySettings:
    """Budget and model of one study. Sizes of data subsets count images."""

    dim: int
    depth: int
    epochs: int
    train_subset: int
    val_size: int
    test_subset: int
    seeds: Tuple[int, ...]
    kernel_sizes: Tuple[int, ...]
    grid_sigma_first: Tuple[float, ...]
    grid_sigma_last: Tuple[float, ...]
    grid_constant: Tuple[float, ...]
    grid_seeds: Tuple[int, ...] = (100,)
    grid_extra_points: Tuple[Tuple[float, float, float], ...] = (EYEBALLED_POINT,)
    source_dim: int = 64
    source_depth: int = 3
    source_kernel_size: int = 7
    source_epochs: int = 1
    source_seed: int = 1000
    patch_size: int = 2
    batch_size: int = 64
    lr: float = 0.01
    data_seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.source_kernel_size in self.kernel_sizes:
            raise ValueError(
                f"source_kernel_size={self.source_kernel_size} is one of the target kernel sizes "
                f"{self.kernel_sizes}; the learned arm tests transfer, so pick a different size"
            )
        if self.source_depth == self.depth:
            raise ValueError(
                f"source_depth={self.source_depth} equals the target depth; the learned arm "
                "tests transfer, so pick a different depth"
            )
        if self.val_size < 1:
            raise ValueError(
                f"val_size must be >= 1, got {self.val_size}; the closed-form parameters are "
                "selected on the validation split"
            )
        for name in ("seeds", "kernel_sizes", "grid_sigma_first", "grid_sigma_last",
                     "grid_constant", "grid_seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for sigma in self.grid_sigma_first + self.grid_sigma_last:
            if not sigma > 0:
                raise ValueError(f"grid sigmas must be > 0, got {sigma}")
        for constant in self.grid_constant:
            covariance.constant_fraction(constant, "grid constant")

    def fingerprint(self):
        """Return the settings that every cached run depends on.

        Seeds, kernel sizes, grid points and the device are left out: runs are cached per seed,
        kernel size and grid point, so a rerun may add some of them.
        """
        keys = ("dim", "depth", "epochs", "train_subset", "val_size", "test_subset",
                "source_dim", "source_depth", "source_kernel_size", "source_epochs", "source_seed",
                "patch_size", "batch_size", "lr", "data_seed")
        return {key: getattr(self, key) for key in keys}

    def grid(self):
        """Return the (sigma_first, sigma_last, constant) points of the selection grid.

        The product of the grid axes, followed by those of ``grid_extra_points`` that the
        product lacks.
        """
        points = [(float(first), float(last), float(constant))
                  for first in self.grid_sigma_first
                  for last in self.grid_sigma_last
                  for constant in self.grid_constant]
        for point in self.grid_extra_points:
            point = tuple(float(value) for value in point)
            if point not in points:
                points.append(point)
        return points


MODES = {
    # docs/results.md records the measured wall time of the modes that were run.
    "quick": StudySettings(
        dim=32, depth=4, epochs=1, train_subset=1000, val_size=500, test_subset=500,
        seeds=(0,), kernel_sizes=(9,),
        grid_sigma_first=(0.5,), grid_sigma_last=(1.5, 4.0), grid_constant=(0.0,),
        source_dim=32, batch_size=32,
    ),
    # Batches of 32 give 63 optimizer steps per run. With 16 steps (1,000 images in batches of
    # 64), most runs ended near chance accuracy.
    "default": StudySettings(
        dim=32, depth=4, epochs=1, train_subset=2000, val_size=1000, test_subset=2000,
        seeds=(0, 1, 2), kernel_sizes=(5, 9),
        grid_sigma_first=(0.5,), grid_sigma_last=(1.5, 4.0), grid_constant=(0.0, 0.3),
        batch_size=32,
    ),
    # The default model with kernel size 15 added, 5 times the data, 2 epochs, a 13-point grid
    # and the whole test split. Trainable 15 x 15 filters dominate its cost on a CPU, because in
    # the measured run their epochs took 3 to 4 times as long as with the filters frozen.
    "full": StudySettings(
        dim=32, depth=4, epochs=2, train_subset=10000, val_size=2000, test_subset=0,
        seeds=(0, 1, 2), kernel_sizes=(5, 9, 15),
        grid_sigma_first=(0.25, 0.5, 1.0), grid_sigma_last=(1.5, 4.0), grid_constant=(0.0, 0.3),
        source_epochs=2, batch_size=32,
    ),
}


# ---------------------------------------------------------------------------------------------
# Fitting the closed-form family to a covariance


def normalized(cov):
    """Return ``cov`` divided by its mean diagonal, so that it has a unit mean diagonal."""
    return cov / cov.diagonal().mean()


def best_constant(target, correlation):
    """Return the least-squares c of ``target ~ (1 - c) * correlation + c``, clipped to its range."""
    direction = 1.0 - correlation
    denominator = float((direction * direction).sum())
    if denominator <= 0.0:
        return 0.0
    constant = float(((target - correlation) * direction).sum()) / denominator
    return min(max(constant, 0.0), FIT_MAX_CONSTANT)


def fit_gaussian(cov, kernel_size):
    """Fit ``covariance.gaussian`` to one covariance by least squares on normalized matrices.

    Both matrices are divided by their mean diagonal, and sigma and the constant c minimize the
    Frobenius norm of the difference. For a fixed sigma the model is linear in c, which then has
    a closed form, so only sigma is searched: on a log grid over ``FIT_SIGMA_RANGE``, then by a
    golden-section search between the neighbours of the best grid point.

    Args:
        cov: (d, d) covariance with d = kh * kw.
        kernel_size: int or (kh, kw).

    Returns:
        dict with ``sigma`` (taps), ``constant``, ``variance`` (the mean diagonal of ``cov``) and
        ``relative_error``, the Frobenius norm of the normalized difference over that of the
        normalized ``cov``.
    """
    kernel_size = _kernel_pair(kernel_size)
    cov = _checks.covariance_stack(cov)[0]
    if cov.shape[-1] != kernel_size[0] * kernel_size[1]:
        raise ValueError(f"cov has size {cov.shape[-1]}, which does not match kernel_size "
                         f"{kernel_size}; pass the kernel size the covariance was built for")
    # NumPy, because the search makes a few hundred tiny evaluations and torch's per-call
    # overhead (its intra-op thread pool) dominates them on a loaded CPU.
    target = normalized(cov).numpy()
    taps = covariance.tap_coordinates(kernel_size).numpy()
    squared_distance = ((taps[:, None, :] - taps[None, :, :]) ** 2).sum(-1)

    def error_at(log_sigma):
        correlation = np.exp(-squared_distance / (2.0 * math.exp(log_sigma) ** 2))
        constant = best_constant(target, correlation)
        model = (1.0 - constant) * correlation + constant
        return float(((target - model) ** 2).sum()), constant

    log_low, log_high = (math.log(bound) for bound in FIT_SIGMA_RANGE)
    grid = np.linspace(log_low, log_high, FIT_GRID_POINTS)
    errors = [error_at(point)[0] for point in grid]
    best = int(np.argmin(errors))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(FIT_REFINE_STEPS):
        left = high - ratio * (high - low)
        right = low + ratio * (high - low)
        if error_at(left)[0] <= error_at(right)[0]:
            high = right
        else:
            low = left
    log_sigma = 0.5 * (low + high)
    if errors[best] < error_at(log_sigma)[0]:
        log_sigma = float(grid[best])
    squared_error, constant = error_at(log_sigma)
    return {
        "sigma": math.exp(log_sigma),
        "constant": constant,
        "variance": float(cov.diagonal().mean()),
        "relative_error": math.sqrt(squared_error) / float(np.linalg.norm(target)),
    }


def fit_bank(bank, kernel_size):
    """Fit ``covariance.gaussian`` to every layer of a bank; return one ``fit_gaussian`` dict each."""
    stack = bank if bank.dim() == 3 else bank.unsqueeze(0)
    return [fit_gaussian(layer, kernel_size) for layer in stack]


def sampling_noise_floor(fit, kernel_size, samples, generator):
    """Return the relative error of ``fit_gaussian`` on the empirical covariance of ``samples`` draws.

    The draws come from the Gaussian that ``fit`` describes, so the fit's own family contains the
    truth and the whole error is the sampling noise of an empirical covariance of that many
    filters: the error a perfect family would still show on a learned bank of that many channels.
    """
    kernel_size = _kernel_pair(kernel_size)
    cov = covariance.gaussian(kernel_size, fit["sigma"], constant=fit["constant"])
    filters = sampling.sample(cov, samples, generator=generator, kernel_size=kernel_size,
                              dtype=torch.float64)
    return fit_gaussian(covariance.empirical(filters), kernel_size)["relative_error"]


def fitted_bank(fits, kernel_size):
    """Build the bank of fitted Gaussians, each at ``covariance.default_variance(kernel_size)``."""
    return torch.stack([
        covariance.gaussian(kernel_size, fit["sigma"], constant=fit["constant"]) for fit in fits
    ])


def with_default_variance(bank, kernel_size):
    """Scale each covariance of ``bank`` to the mean diagonal of PyTorch's default init."""
    variance = covariance.default_variance(kernel_size)
    means = bank.diagonal(dim1=-2, dim2=-1).mean(-1)
    return bank * (variance / means)[:, None, None]


def transfer(source_bank, source_kernel_size, kernel_size, depth):
    """Resize a learned bank to ``kernel_size``, interpolate it to ``depth`` layers and rescale it."""
    resized = covariance.resize(source_bank, kernel_size, source_kernel_size=source_kernel_size)
    return with_default_variance(covariance.interpolate_depth(resized, depth), kernel_size)


def _kernel_pair(kernel_size):
    if isinstance(kernel_size, int):
        return (kernel_size, kernel_size)
    return tuple(kernel_size)


# ---------------------------------------------------------------------------------------------
# Cached runs


class CacheError(ValueError):
    """A cached result in the output folder is corrupt or belongs to other settings."""


def read_json(path):
    """Read a JSON cache file, raising ``CacheError`` that names it when it cannot be parsed."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(
            f"{path} is a corrupt cache file ({error}); delete it to rerun what it records"
        ) from None


def write_json(path, payload):
    """Write ``payload`` as JSON via a temporary file, so an interrupted write leaves no partial file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2)
        file.write("\n")
    partial.replace(path)


def load_run(path, key):
    """Return the cached record of run ``key`` at ``path``, or None when it has not run yet."""
    path = Path(path)
    if not path.exists():
        return None
    record = read_json(path)
    required = ("key", "test_accuracy", "val_accuracy", "history", "seconds_per_epoch")
    if not isinstance(record, dict) or any(name not in record for name in required):
        raise CacheError(
            f"{path} is a corrupt cache file: it lacks one of the fields {required}; delete it "
            "to rerun what it records"
        )
    if record["key"] != key:
        raise CacheError(
            f"{path} records run {record['key']!r}, expected {key!r}; delete it to rerun {key}"
        )
    return record


def check_study_file(output_dir, settings):
    """Record the settings' fingerprint in ``study.json``, or check it against an earlier run."""
    path = Path(output_dir) / STUDY_FILE
    fingerprint = settings.fingerprint()
    if path.exists():
        stored = read_json(path)
        if not isinstance(stored, dict):
            raise CacheError(f"{path} is a corrupt cache file: expected a JSON object")
        differing = sorted(key for key in fingerprint if stored.get(key) != fingerprint[key])
        if differing:
            listing = ", ".join(f"{key}: {stored.get(key)!r} there, {fingerprint[key]!r} now"
                                for key in differing)
            raise CacheError(
                f"{output_dir} contains a study with other settings ({listing}); pass another "
                "--output folder, or delete that one to start over"
            )
    else:
        write_json(path, fingerprint)


def run_key(init, depthwise, kernel_size, seed, params=None):
    """Return the cache key of one run; closed-form runs include their parameters."""
    label = init
    if params is not None:
        sigma_first, sigma_last, constant = params
        label = f"{init}-sf{sigma_first:g}-sl{sigma_last:g}-c{constant:g}"
    return f"{label}_{depthwise}_k{kernel_size}_seed{seed}"


# ---------------------------------------------------------------------------------------------
# The study


class Study:
    """One study in one output folder: the source bank, the grid, the arms and the report.

    Args:
        settings: ``StudySettings``.
        output_dir: folder of the cache and the outputs; created if missing.
        dataset: optional ``data.FashionMNIST`` with the splits of ``settings``. Without one, the
            data is loaded from ``data_dir``.
        data_dir: Fashion-MNIST folder, None for ``data.DEFAULT_DATA_DIR``.
        train_fn: function called as ``train_fn(config, model=..., dataset=..., progress=...,
            log=...)`` that returns a dict like ``train.train``; replaceable in tests.
        progress: whether to draw tqdm progress bars.
        log: function called with one line of text per event.
    """

    def __init__(self, settings, output_dir, *, dataset=None, data_dir=None,
                 train_fn=train.train, progress=True, log=None):
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.runs_dir = self.output_dir / RUNS_DIR
        self.dataset = dataset
        self.data_dir = data_dir
        self.train_fn = train_fn
        self.progress = progress
        self.log = log if log is not None else tqdm.write
        self.trained = 0
        self.bar = None

    # -- data and training -----------------------------------------------------------------

    def data(self):
        if self.dataset is None:
            s = self.settings
            self.dataset = data.load_fashion_mnist(
                self.data_dir, train_subset=s.train_subset, val_size=s.val_size,
                test_subset=s.test_subset, seed=s.data_seed,
            )
        return self.dataset

    def config(self, *, depth, kernel_size, depthwise, seed, epochs, dim=None):
        s = self.settings
        # ``init`` is only recorded by train(): the model is built here and passed in.
        return train.TrainConfig(
            dim=dim or s.dim, depth=depth, kernel_size=kernel_size, patch_size=s.patch_size,
            depthwise=depthwise, init="default", epochs=epochs, train_subset=s.train_subset,
            val_size=s.val_size, test_subset=s.test_subset, batch_size=s.batch_size, lr=s.lr,
            seed=seed, data_seed=s.data_seed, device=s.device,
        )

    def build_model(self, *, depth, kernel_size, depthwise, bank, seed, dim=None):
        """Build a ConvMixer whose weights outside the depthwise filters depend on ``seed`` only."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        return models.ConvMixer(
            dim or self.settings.dim, depth, kernel_size, self.settings.patch_size,
            depthwise=depthwise, init="default" if bank is None else bank, generator=generator,
        )

    def train_model(self, model, config):
        results = self.train_fn(config, model=model, dataset=self.data(),
                                progress=self.progress, log=lambda line: None)
        self.trained += 1
        return results

    def run(self, key, *, kernel_size, depthwise, seed, bank, extra=None):
        """Return the record of run ``key``, training it unless its JSON file exists."""
        path = self.runs_dir / f"{key}.json"
        record = load_run(path, key)
        if record is None:
            if self.bar is not None:
                self.bar.set_postfix_str(key)
            model = self.build_model(depth=self.settings.depth, kernel_size=kernel_size,
                                     depthwise=depthwise, bank=bank, seed=seed)
            config = self.config(depth=self.settings.depth, kernel_size=kernel_size,
                                 depthwise=depthwise, seed=seed, epochs=self.settings.epochs)
            results = self.train_model(model, config)
            record = run_record(key, results)
            record.update(extra or {})
            write_json(path, record)
            self.log(f"{key}: test accuracy {record['test_accuracy']:.4f}, validation accuracy "
                     f"{record['val_accuracy']:.4f}, {record['seconds_per_epoch']:.1f} s/epoch")
        if self.bar is not None:
            self.bar.update()
        return record

    # -- steps ------------------------------------------------------------------------------

    def source_bank(self):
        """Train the source ConvMixer, or load its cached bank; return the (L, d, d) bank."""
        s = self.settings
        bank_path = self.output_dir / SOURCE_BANK_FILE
        if bank_path.exists():
            try:
                bank, _ = covariance.load_bank(bank_path)
            except ValueError as error:
                raise CacheError(f"{error}; delete {bank_path} to retrain the source model") from None
            expected = (s.source_depth, s.source_kernel_size**2, s.source_kernel_size**2)
            if tuple(bank.shape) != expected:
                raise CacheError(
                    f"{bank_path} contains a bank of shape {tuple(bank.shape)}, expected "
                    f"{expected}; delete it to retrain the source model"
                )
            return bank
        self.log(f"training the source model: dim {s.source_dim}, depth {s.source_depth}, "
                 f"kernel size {s.source_kernel_size}, {s.source_epochs} epoch(s)")
        model = self.build_model(depth=s.source_depth, kernel_size=s.source_kernel_size,
                                 depthwise="trainable", bank=None, seed=s.source_seed,
                                 dim=s.source_dim)
        config = self.config(depth=s.source_depth, kernel_size=s.source_kernel_size,
                             depthwise="trainable", seed=s.source_seed, epochs=s.source_epochs,
                             dim=s.source_dim)
        results = self.train_model(model, config)
        bank = covariance.from_model(model.cpu())
        write_json(self.output_dir / SOURCE_RUN_FILE, run_record("source", results))
        covariance.save_bank(bank_path, bank, kernel_size=s.source_kernel_size, kind="empirical",
                             source="convcov_fast.study source model", depth=s.source_depth,
                             epochs=s.source_epochs, seed=s.source_seed)
        self.log(f"source model: test accuracy {results['test_accuracy']:.4f}; wrote {bank_path}")
        return bank

    def select_closed_form(self):
        """Run the grid with frozen filters and return (best point, per-point scores).

        A point's score is its mean validation accuracy over the kernel sizes and grid seeds.
        Ties go to the earlier point of ``StudySettings.grid``.
        """
        s = self.settings
        scores = []
        for params in s.grid():
            accuracies = []
            for kernel_size in s.kernel_sizes:
                bank = covariance.closed_form(s.depth, kernel_size, sigma_first=params[0],
                                              sigma_last=params[1], constant=params[2])
                for seed in s.grid_seeds:
                    key = run_key("closed_form", "frozen", kernel_size, seed, params)
                    record = self.run(key, kernel_size=kernel_size, depthwise="frozen", seed=seed,
                                      bank=bank, extra={"params": list(params)})
                    accuracies.append(record["val_accuracy"])
            scores.append({
                "sigma_first": params[0], "sigma_last": params[1], "constant": params[2],
                "val_accuracy_mean": float(np.mean(accuracies)),
                "val_accuracy_std": _std(accuracies),
                "runs": len(accuracies),
            })
        best = max(range(len(scores)), key=lambda index: (scores[index]["val_accuracy_mean"], -index))
        return s.grid()[best], scores

    def arm_banks(self, kernel_size, source_bank, selected):
        """Return {init: bank or None} for one target kernel size, and the fits of the learned bank."""
        s = self.settings
        learned = transfer(source_bank, s.source_kernel_size, kernel_size, s.depth)
        fits = fit_bank(learned, kernel_size)
        closed = covariance.closed_form(s.depth, kernel_size, sigma_first=selected[0],
                                        sigma_last=selected[1], constant=selected[2])
        banks = {"default": None, "closed_form": closed, "learned": learned,
                 "fitted": fitted_bank(fits, kernel_size)}
        return banks, fits

    def execute(self, *, report=True):
        """Run every missing step of the study and return the results dict.

        With ``report`` True, the tables and figures are written to the output folder too.
        """
        start = time.perf_counter()
        s = self.settings
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(exist_ok=True)
        check_study_file(self.output_dir, s)

        total = (len(s.grid()) * len(s.kernel_sizes) * len(s.grid_seeds)
                 + len(INITS) * len(DEPTHWISE_KINDS) * len(s.kernel_sizes) * len(s.seeds))
        self.bar = tqdm(total=total, desc="study", unit="run", disable=not self.progress)
        try:
            source_bank = self.source_bank()
            selected, grid_scores = self.select_closed_form()
            self.log("selected on the validation split: sigma_first={:g}, sigma_last={:g}, "
                     "constant={:g}".format(*selected))
            banks, fits, records = {}, {}, {}
            for kernel_size in s.kernel_sizes:
                banks[kernel_size], fits[kernel_size] = self.arm_banks(kernel_size, source_bank,
                                                                       selected)
            # Seeds are the outer loop, so an interrupted study has every arm at its first seeds.
            for seed in s.seeds:
                for kernel_size in s.kernel_sizes:
                    for init in INITS:
                        for depthwise in DEPTHWISE_KINDS:
                            params = selected if init == "closed_form" else None
                            key = run_key(init, depthwise, kernel_size, seed, params)
                            records[(init, depthwise, kernel_size, seed)] = self.run(
                                key, kernel_size=kernel_size, depthwise=depthwise, seed=seed,
                                bank=banks[kernel_size][init],
                            )
        finally:
            self.bar.close()
            self.bar = None

        results = {
            "settings": dataclasses.asdict(s),
            "selected": {"sigma_first": selected[0], "sigma_last": selected[1],
                         "constant": selected[2]},
            "grid": grid_scores,
            "source_fits": self.source_fits(source_bank),
            "fits": {str(k): v for k, v in fits.items()},
            "table": summary_table(records, s),
            "runs_trained": self.trained,
            "wall_time_s": time.perf_counter() - start,
            "run_wall_time_s": self.cached_wall_time(),
            "torch_version": torch.__version__,
            "num_threads": torch.get_num_threads(),
        }
        if report:
            self.write_report(results, records, banks, source_bank)
        return results

    def source_fits(self, source_bank):
        """Fit every layer of the source bank and add the sampling noise floor of each fit."""
        s = self.settings
        fits = fit_bank(source_bank, s.source_kernel_size)
        generator = torch.Generator().manual_seed(0)
        for fit in fits:
            fit["noise_floor"] = sampling_noise_floor(fit, s.source_kernel_size, s.source_dim,
                                                      generator)
        return fits

    def cached_wall_time(self):
        """Return the summed wall time of the source run and every cached run, in seconds."""
        paths = sorted(self.runs_dir.glob("*.json")) + [self.output_dir / SOURCE_RUN_FILE]
        total = 0.0
        for path in paths:
            if path.exists():
                record = read_json(path)
                total += float(record.get("wall_time_s", 0.0)) if isinstance(record, dict) else 0.0
        return total

    # -- report -----------------------------------------------------------------------------

    def write_report(self, results, records, banks, source_bank):
        s = self.settings
        write_json(self.output_dir / RESULTS_JSON, results)
        (self.output_dir / RESULTS_MARKDOWN).write_text(markdown_report(results), encoding="utf-8")
        plot_curves(records, s, self.output_dir / CURVES_FILE)
        generator = torch.Generator().manual_seed(0)
        source_filters = sampling.sample(with_default_variance(source_bank, s.source_kernel_size),
                                         FIGURE_FILTERS, generator=generator)
        plots.plot_bank(source_bank, s.source_kernel_size, self.output_dir / SOURCE_FIGURE,
                        filters=source_filters)
        for kernel_size in s.kernel_sizes:
            plot_banks(banks[kernel_size], kernel_size,
                       self.output_dir / f"banks_k{kernel_size}.png")
            plot_filters(banks[kernel_size], kernel_size,
                         self.output_dir / f"filters_k{kernel_size}.png")
        self.log(f"wrote {RESULTS_MARKDOWN}, {RESULTS_JSON} and figures to {self.output_dir}")


def run_record(key, results):
    """Keep what the report needs from the results of ``train.train``."""
    history = [
        {name: entry[name] for name in ("epoch", "train_loss", "test_accuracy", "val_accuracy",
                                        "epoch_time_s", "loss_trace") if name in entry}
        for entry in results["history"]
    ]
    return {
        "key": key,
        "test_accuracy": results["test_accuracy"],
        "val_accuracy": results["val_accuracy"],
        "seconds_per_epoch": float(np.mean([entry["epoch_time_s"] for entry in history])),
        "wall_time_s": float(results.get("wall_time_s", 0.0)),
        "history": history,
    }


def _std(values):
    """Return the sample standard deviation, or None for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summary_table(records, settings):
    """Return one row per (kernel size, init, depthwise) with means and spreads over seeds.

    ``test_gain_vs_default`` is the mean over seeds of the test accuracy minus that of the
    default init with the same depthwise kind and seed, with its standard deviation.
    """
    rows = []
    for kernel_size in settings.kernel_sizes:
        for depthwise in DEPTHWISE_KINDS:
            for init in INITS:
                runs = [records[(init, depthwise, kernel_size, seed)] for seed in settings.seeds]
                baseline = [records[("default", depthwise, kernel_size, seed)]
                            for seed in settings.seeds]
                test = [run["test_accuracy"] for run in runs]
                val = [run["val_accuracy"] for run in runs]
                gains = [run["test_accuracy"] - base["test_accuracy"]
                         for run, base in zip(runs, baseline)]
                rows.append({
                    "kernel_size": kernel_size, "init": init, "depthwise": depthwise,
                    "seeds": len(runs),
                    "test_accuracy_mean": float(np.mean(test)), "test_accuracy_std": _std(test),
                    "val_accuracy_mean": float(np.mean(val)), "val_accuracy_std": _std(val),
                    "test_gain_vs_default_mean": float(np.mean(gains)),
                    "test_gain_vs_default_std": _std(gains),
                    "seconds_per_epoch_mean": float(np.mean([r["seconds_per_epoch"] for r in runs])),
                })
    return rows


def _percent(mean, std):
    text = f"{100 * mean:.2f}"
    return text if std is None else f"{text} ± {100 * std:.2f}"


def markdown_table(rows):
    """Format the rows of ``summary_table`` as a markdown table, accuracies in percent."""
    lines = [
        "| kernel | init | depthwise | test accuracy (%) | gain vs default (points) | "
        "validation accuracy (%) | s/epoch | seeds |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        gain = ("–" if row["init"] == "default" else
                _percent(row["test_gain_vs_default_mean"], row["test_gain_vs_default_std"]))
        lines.append(
            f"| {row['kernel_size']} | {row['init']} | {row['depthwise']} | "
            f"{_percent(row['test_accuracy_mean'], row['test_accuracy_std'])} | {gain} | "
            f"{_percent(row['val_accuracy_mean'], row['val_accuracy_std'])} | "
            f"{row['seconds_per_epoch_mean']:.1f} | {row['seeds']} |"
        )
    return "\n".join(lines)


def markdown_report(results):
    """Return the markdown summary of a study: the table, the selection and the fits."""
    selected = results["selected"]
    lines = [
        "# Initialization study",
        "",
        "Accuracies are mean ± sample standard deviation over seeds. Gains are paired by seed.",
        "",
        markdown_table(results["table"]),
        "",
        "## Closed-form parameters selected on the validation split",
        "",
        "Frozen filters; mean validation accuracy over kernel sizes and grid seeds.",
        "",
        "| sigma_first | sigma_last | constant | validation accuracy (%) | runs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for point in results["grid"]:
        mark = " (selected)" if (point["sigma_first"], point["sigma_last"], point["constant"]) == (
            selected["sigma_first"], selected["sigma_last"], selected["constant"]) else ""
        lines.append(
            f"| {point['sigma_first']:g} | {point['sigma_last']:g} | {point['constant']:g} | "
            f"{_percent(point['val_accuracy_mean'], point['val_accuracy_std'])}{mark} | "
            f"{point['runs']} |"
        )
    lines += ["", "## Closed-form fits to the learned covariances", "",
              "The noise floor is the relative error of the same fit on the empirical covariance "
              "of as many filters, drawn from the fitted Gaussian itself.", "",
              "| bank | layer | sigma (taps) | constant | relative error | noise floor |",
              "|---|---:|---:|---:|---:|---:|"]
    fit_sets = [(f"source k={results['settings']['source_kernel_size']}", results["source_fits"])]
    fit_sets += [(f"transferred k={k}", fits) for k, fits in results["fits"].items()]
    for name, fits in fit_sets:
        for layer, fit in enumerate(fits):
            floor = f"{fit['noise_floor']:.3f}" if "noise_floor" in fit else "–"
            lines.append(f"| {name} | {layer} | {fit['sigma']:.3f} | {fit['constant']:.3f} | "
                         f"{fit['relative_error']:.3f} | {floor} |")
    lines += ["", f"Training runs took {results['run_wall_time_s']:.0f} s together, as each run "
              f"measured itself. This invocation trained {results['runs_trained']} run(s) and took "
              f"{results['wall_time_s']:.0f} s. torch {results['torch_version']}, "
              f"{results['num_threads']} threads.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def plot_curves(records, settings, path):
    """Draw training loss and test accuracy against epoch, mean over seeds, per kernel size."""
    kernels = settings.kernel_sizes
    figure, axes = plt.subplots(2, len(kernels), figsize=(4.2 * len(kernels), 6.4),
                                squeeze=False, layout="constrained")
    colors = dict(zip(INITS, ("tab:gray", "tab:blue", "tab:green", "tab:orange")))
    styles = {"trainable": "-", "frozen": "--"}
    for column, kernel_size in enumerate(kernels):
        loss_axes, accuracy_axes = axes[0, column], axes[1, column]
        for init in INITS:
            for depthwise in DEPTHWISE_KINDS:
                runs = [records[(init, depthwise, kernel_size, seed)] for seed in settings.seeds]
                label = f"{init}, {depthwise}"
                style = dict(color=colors[init], linestyle=styles[depthwise])
                traces = [np.array([point for entry in run["history"]
                                    for point in entry.get("loss_trace", [])]) for run in runs]
                if all(len(trace) for trace in traces) and len({len(t) for t in traces}) == 1:
                    stacked = np.stack(traces)
                    loss_axes.plot(stacked[0, :, 0], stacked[:, :, 1].mean(0), label=label, **style)
                epochs = [entry["epoch"] for entry in runs[0]["history"]]
                accuracy = np.array([[entry["test_accuracy"] for entry in run["history"]]
                                     for run in runs])
                accuracy_axes.errorbar(epochs, 100 * accuracy.mean(0),
                                       yerr=None if len(runs) < 2 else 100 * accuracy.std(0, ddof=1),
                                       marker="o", capsize=3, label=label, **style)
        loss_axes.set_title(f"kernel {kernel_size}: training loss", fontsize=10)
        loss_axes.set_xlabel("epoch")
        loss_axes.set_ylabel("cross-entropy (running mean)")
        accuracy_axes.set_title(f"kernel {kernel_size}: test accuracy", fontsize=10)
        accuracy_axes.set_xlabel("epoch")
        accuracy_axes.set_ylabel("accuracy (%), mean ± std over seeds")
        accuracy_axes.set_xticks(range(1, settings.epochs + 1))
        for item in (loss_axes, accuracy_axes):
            item.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    figure.savefig(Path(path), dpi=FIGURE_DPI)
    plt.close(figure)


def _symmetric_limit(values):
    finite = values[np.isfinite(values)]
    return float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0


def plot_banks(banks, kernel_size, path):
    """Draw the learned, fitted and closed-form covariances and learned minus fitted.

    Rows are the first and the last layer only, which keeps the PNG of a 9 x 9 bank under
    300 KB. Covariances are divided by their mean diagonal and shown in the grid-of-blocks view of
    ``plots.covariance_blocks``. Each row shares one colour scale, so the residual column shows
    how much of the learned structure the fit misses.
    """
    pair = _kernel_pair(kernel_size)
    learned, fitted, closed = (normalized_stack(banks[name]) for name in ("learned", "fitted",
                                                                          "closed_form"))
    columns = [("learned (transferred)", learned), ("fitted", fitted), ("closed form", closed),
               ("learned − fitted", learned - fitted)]
    shown = sorted({0, learned.shape[0] - 1})
    figure, axes = plt.subplots(len(shown), len(columns),
                                figsize=(2.3 * len(columns), 2.2 * len(shown)),
                                squeeze=False, layout="constrained")
    for row, layer in enumerate(shown):
        grids = [plots.covariance_blocks(stack[layer], pair) for _, stack in columns]
        limit = max(_symmetric_limit(grid) for grid in grids)
        for column, ((title, _), grid) in enumerate(zip(columns, grids)):
            image = axes[row, column].imshow(grid, cmap=plots.CMAP, vmin=-limit, vmax=limit,
                                             interpolation="nearest")
            axes[row, column].set_title(f"layer {layer}: {title}", fontsize=8)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        figure.colorbar(image, ax=axes[row, -1], shrink=0.8)
    figure.savefig(Path(path), dpi=FIGURE_DPI)
    plt.close(figure)


def normalized_stack(bank):
    return bank / bank.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]


def plot_filters(banks, kernel_size, path):
    """Draw filters sampled from each arm's bank, for the first and the last layer."""
    pair = _kernel_pair(kernel_size)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for init in INITS:
        bank = banks[init]
        if bank is None:
            bound = 1.0 / math.sqrt(pair[0] * pair[1])
            filters = torch.rand(2, FIGURE_FILTERS, *pair, generator=generator) * 2 * bound - bound
        else:
            filters = sampling.sample(bank[[0, -1]], FIGURE_FILTERS, generator=generator,
                                      kernel_size=pair)
        rows.append((f"{init}, first layer", filters[0]))
        rows.append((f"{init}, last layer", filters[1]))
    figure, axes = plt.subplots(len(rows), FIGURE_FILTERS,
                                figsize=(1.1 * FIGURE_FILTERS + 1.2, 1.1 * len(rows)),
                                squeeze=False, layout="constrained")
    for row, (title, filters) in enumerate(rows):
        for column in range(FIGURE_FILTERS):
            sample = filters[column].numpy()
            limit = _symmetric_limit(sample)
            axes[row, column].imshow(sample, cmap=plots.CMAP, vmin=-limit, vmax=limit,
                                     interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    figure.savefig(Path(path), dpi=FIGURE_DPI)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line


def _int_at_least(minimum):
    """Return an argparse type that parses an integer >= ``minimum``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser):
    """Add the options of ``convcov-fast study`` to ``parser``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="tiny budget: kernel size 9, 1 seed, 1 epoch on 1,000 images, "
                           "a 3-point grid")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="kernel sizes 5, 9 and 15, 2 epochs on 10,000 images, a 13-point "
                           "grid, the whole test split")
    parser.set_defaults(mode="default")
    parser.add_argument("--output", metavar="DIR", default="study",
                        help="folder of the cached runs, the tables and the figures; a rerun "
                             "reuses finished runs (default: study)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"folder with the Fashion-MNIST .gz files (default: {data.DEFAULT_DATA_DIR})")
    parser.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=None,
                        help="seeds of every arm (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--kernel-sizes", type=_int_at_least(1), nargs="+", default=None,
                        help="target kernel sizes (default: 5 9; 9 with --quick; 5 9 15 with "
                             "--full)")
    parser.add_argument("--epochs", type=_int_at_least(1), default=None,
                        help="training epochs of every run (default: 1, or 2 with --full)")
    parser.add_argument("--train-subset", type=_int_at_least(1), default=None,
                        help="training images per run (default: 2,000; 1,000 with --quick; "
                             "10,000 with --full)")
    parser.add_argument("--device", choices=train.DEVICES, default="auto",
                        help="device of the training runs (default: auto, CUDA when available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not draw progress bars")


def settings_from_args(args):
    """Return the ``StudySettings`` of the mode in ``args`` with its overrides applied."""
    overrides = {"device": args.device}
    if args.seeds is not None:
        overrides["seeds"] = tuple(dict.fromkeys(args.seeds))
    if args.kernel_sizes is not None:
        overrides["kernel_sizes"] = tuple(dict.fromkeys(args.kernel_sizes))
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.train_subset is not None:
        overrides["train_subset"] = args.train_subset
    return dataclasses.replace(MODES[args.mode], **overrides)


def run(args):
    """Run ``convcov-fast study`` and return its exit status."""
    settings = settings_from_args(args)
    start = time.perf_counter()
    study = Study(settings, args.output, data_dir=args.data, progress=args.progress)
    results = study.execute()
    print(markdown_table(results["table"]))
    selected = results["selected"]
    print(f"selected closed form: sigma_first={selected['sigma_first']:g}, "
          f"sigma_last={selected['sigma_last']:g}, constant={selected['constant']:g}")
    print(f"{study.trained} run(s) trained in {time.perf_counter() - start:.0f} s; "
          f"results in {args.output}")
    return 0
