"""Figures: learning curves of a training run, and covariance banks with sample filters.

Matplotlib uses the non-interactive Agg backend, so figures render without a display.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

CMAP = "RdBu_r"


def plot_history(history, path):
    """Draw training loss and accuracy against epoch into the PNG file ``path``.

    Args:
        history: list of per-epoch dicts as ``train.train`` records them, with ``epoch``,
            ``train_loss`` and ``test_accuracy``. Optional keys: ``val_accuracy``, and
            ``loss_trace``, a list of [fractional epoch, mean loss] points drawn as a line.
        path: output file. Its folder must exist.
    """
    if not history:
        raise ValueError("history is empty; train for at least one epoch before plotting")
    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")

    trace = [point for entry in history for point in entry.get("loss_trace", [])]
    if trace:
        positions, losses = zip(*trace)
        loss_axes.plot(positions, losses, color="tab:blue", alpha=0.6,
                       label="mean over batch windows")
    loss_axes.plot(epochs, [entry["train_loss"] for entry in history], "o", color="tab:blue",
                   label="epoch mean")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (cross-entropy)")
    loss_axes.legend()

    accuracy_axes.plot(epochs, [entry["test_accuracy"] for entry in history], "o-", label="test")
    if any("val_accuracy" in entry for entry in history):
        val_epochs = [entry["epoch"] for entry in history if "val_accuracy" in entry]
        val_accuracy = [entry["val_accuracy"] for entry in history if "val_accuracy" in entry]
        accuracy_axes.plot(val_epochs, val_accuracy, "s-", label="validation")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.legend()

    for axes in (loss_axes, accuracy_axes):
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
    figure.savefig(Path(path), dpi=100)
    plt.close(figure)


def covariance_blocks(cov, kernel_size):
    """Arrange a (d, d) filter covariance as a kh x kw grid of kh x kw blocks.

    Block (i, j) is row ``i * kw + j`` of ``cov``, the covariance of tap (i, j) with every tap,
    laid out as a kh x kw image. One row or column of NaN, which ``imshow`` leaves blank,
    separates neighbouring blocks.

    Returns:
        float64 numpy array of shape (kh * (kh + 1) - 1, kw * (kw + 1) - 1).
    """
    kh, kw = kernel_size
    cov = torch.as_tensor(cov).detach().to("cpu", torch.float64)
    if cov.shape != (kh * kw, kh * kw):
        raise ValueError(
            f"cov must have shape ({kh * kw}, {kh * kw}) for kernel_size {(kh, kw)}, "
            f"got {tuple(cov.shape)}"
        )
    blocks = cov.reshape(kh, kw, kh, kw).numpy()
    grid = np.full((kh * (kh + 1) - 1, kw * (kw + 1) - 1), np.nan)
    for i in range(kh):
        for j in range(kw):
            top, left = i * (kh + 1), j * (kw + 1)
            grid[top : top + kh, left : left + kw] = blocks[i, j]
    return grid


def plot_bank(bank, kernel_size, path, *, filters=None):
    """Draw each covariance of a bank, with sample filters, into the PNG file ``path``.

    Each layer gets one row: its covariance in the grid-of-blocks view of ``covariance_blocks``,
    then that layer's sample filters when ``filters`` is given. Every image has its own colour
    scale, symmetric around 0.

    Args:
        bank: (d, d) covariance or (L, d, d) bank, d = kh * kw.
        kernel_size: int or (kh, kw).
        path: output file. Its folder must exist.
        filters: optional sample filters, (n, kh, kw) for a single covariance or (L, n, kh, kw)
            for a bank. A size-1 channel dimension, (..., n, 1, kh, kw), is accepted too.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    bank = torch.as_tensor(bank).detach().to("cpu", torch.float64)
    if bank.dim() == 2:
        bank = bank.unsqueeze(0)
    if bank.dim() != 3 or bank.shape[1:] != (kh * kw, kh * kw):
        raise ValueError(
            f"bank must have shape (d, d) or (L, d, d) with d = {kh * kw} for kernel_size "
            f"{(kh, kw)}, got {tuple(bank.shape)}"
        )
    layers = bank.shape[0]
    filters = _filters_per_layer(filters, layers, (kh, kw))
    columns = 1 + (0 if filters is None else filters.shape[1])

    figure, axes = plt.subplots(
        layers,
        columns,
        figsize=(2.8 + 1.1 * (columns - 1), 2.5 * layers),
        squeeze=False,
        gridspec_kw={"width_ratios": [2.4] + [1.0] * (columns - 1)},
        layout="constrained",
    )
    for layer in range(layers):
        grid = covariance_blocks(bank[layer], (kh, kw))
        image = axes[layer, 0].imshow(grid, cmap=CMAP, norm=_symmetric_norm(grid))
        title = f"layer {layer} covariance" if layers > 1 else "covariance"
        axes[layer, 0].set_title(title, fontsize=9)
        figure.colorbar(image, ax=axes[layer, 0], shrink=0.8)
        for column in range(1, columns):
            sample = filters[layer, column - 1].numpy()
            axes[layer, column].imshow(sample, cmap=CMAP, norm=_symmetric_norm(sample))
            if layer == 0:
                axes[layer, column].set_title(f"filter {column - 1}", fontsize=9)
    for axes_item in axes.flat:
        axes_item.set_xticks([])
        axes_item.set_yticks([])
    figure.savefig(Path(path), dpi=100)
    plt.close(figure)


def _symmetric_norm(values):
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    limit = limit or 1.0
    return matplotlib.colors.Normalize(vmin=-limit, vmax=limit)


def _filters_per_layer(filters, layers, kernel_size):
    """Return ``filters`` as a float64 (L, n, kh, kw) tensor, or None."""
    if filters is None:
        return None
    filters = torch.as_tensor(filters).detach().to("cpu", torch.float64)
    if filters.dim() == 5 and filters.shape[2] == 1:
        filters = filters.squeeze(2)
    elif filters.dim() == 4 and layers == 1 and filters.shape[1] == 1:
        filters = filters.squeeze(1).unsqueeze(0)
    elif filters.dim() == 3 and layers == 1:
        filters = filters.unsqueeze(0)
    kh, kw = kernel_size
    if filters.dim() != 4 or filters.shape[0] != layers or tuple(filters.shape[2:]) != (kh, kw):
        raise ValueError(
            f"filters must have shape (n, {kh}, {kw}) for one covariance or "
            f"({layers}, n, {kh}, {kw}) for this bank, got {tuple(filters.shape)}"
        )
    return filters
