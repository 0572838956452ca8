"""The ``convcov-fast`` command line: train, sample, covariance, plot, bench and study.

Each subcommand parses its options and calls the library. Invalid input (a missing dataset or
file, a bad value) ends with a one-line ``error: ...`` message on stderr and exit status 2.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import covariance, data, plots, sampling, train

EXIT_USAGE = 2
DEFAULTS = train.TrainConfig
DEFAULT_KERNEL_SIZE = 9


def positive_int(text):
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text):
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text):
    value = _parse(float, text, "a number")
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text):
    value = _parse(float, text, "a number")
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _parse(kind, text, description):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# train


def add_train_arguments(parser):
    model = parser.add_argument_group("model")
    model.add_argument(
        "--init", default=DEFAULTS.init, metavar="{default,closed_form,PATH}",
        help="initialization of the depthwise filters: 'default' (PyTorch's uniform init), "
             "'closed_form' (Gaussian covariances that widen with depth), or the path of a bank "
             f"file written by 'convcov-fast covariance' (default: {DEFAULTS.init})",
    )
    frozen = model.add_mutually_exclusive_group()
    frozen.add_argument(
        "--frozen", dest="depthwise", action="store_const", const="frozen",
        help="keep the depthwise filters fixed at their initial values"
             + (" (default)" if DEFAULTS.depthwise == "frozen" else ""),
    )
    frozen.add_argument(
        "--trainable", dest="depthwise", action="store_const", const="trainable",
        help="train the depthwise filters"
             + (" (default)" if DEFAULTS.depthwise == "trainable" else ""),
    )
    parser.set_defaults(depthwise=DEFAULTS.depthwise)
    model.add_argument("--dim", type=positive_int, default=DEFAULTS.dim,
                       help=f"channels of every ConvMixer block (default: {DEFAULTS.dim})")
    model.add_argument("--depth", type=positive_int, default=DEFAULTS.depth,
                       help=f"number of ConvMixer blocks (default: {DEFAULTS.depth})")
    model.add_argument("--kernel-size", type=positive_int, default=DEFAULTS.kernel_size,
                       help="side of the square depthwise kernel, in cells of the patch grid "
                            f"(default: {DEFAULTS.kernel_size})")
    model.add_argument("--patch-size", type=positive_int, default=DEFAULTS.patch_size,
                       help="side of the square patches of the stem, in pixels "
                            f"(default: {DEFAULTS.patch_size})")

    optimization = parser.add_argument_group("training")
    optimization.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs,
                              help=f"passes over the training images (default: {DEFAULTS.epochs})")
    optimization.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                              help=f"training images per step (default: {DEFAULTS.batch_size})")
    optimization.add_argument("--lr", type=positive_float, default=DEFAULTS.lr,
                              help=f"peak AdamW learning rate (default: {DEFAULTS.lr})")
    optimization.add_argument("--weight-decay", type=non_negative_float,
                              default=DEFAULTS.weight_decay,
                              help=f"AdamW weight decay (default: {DEFAULTS.weight_decay})")
    optimization.add_argument("--schedule", choices=train.SCHEDULES, default=DEFAULTS.schedule,
                              help="learning-rate schedule over all steps: one-cycle, or linear "
                                   f"warmup then cosine decay (default: {DEFAULTS.schedule})")
    optimization.add_argument("--augment", action="store_true",
                              help="randomly crop (2-pixel padding) and horizontally flip the "
                                   "training images")
    optimization.add_argument("--seed", type=non_negative_int, default=DEFAULTS.seed,
                              help="seed of the weights, the sampled filters and the batch order "
                                   f"(default: {DEFAULTS.seed})")

    dataset = parser.add_argument_group("data")
    dataset.add_argument("--data", metavar="DIR", default=None,
                         help="folder with the four Fashion-MNIST IDX .gz files "
                              f"(default: {data.DEFAULT_DATA_DIR})")
    dataset.add_argument("--train-subset", type=non_negative_int, default=DEFAULTS.train_subset,
                         help="number of training images, class-balanced; 0 uses all 60,000 "
                              f"(default: {DEFAULTS.train_subset})")
    dataset.add_argument("--val-size", type=non_negative_int, default=DEFAULTS.val_size,
                         help="number of training images held out as a validation split, "
                              f"evaluated every epoch; 0 for none (default: {DEFAULTS.val_size})")
    dataset.add_argument("--test-subset", type=non_negative_int, default=DEFAULTS.test_subset,
                         help="number of test images to evaluate on, class-balanced; 0 uses all "
                              f"10,000 (default: {DEFAULTS.test_subset})")
    dataset.add_argument("--data-seed", type=non_negative_int, default=DEFAULTS.data_seed,
                         help="seed of the subset and validation-split selection "
                              f"(default: {DEFAULTS.data_seed})")

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=train.DEVICES, default=DEFAULTS.device,
                     help="device to train on; auto picks CUDA when available "
                          f"(default: {DEFAULTS.device})")
    layout = run.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true",
                        help="use the channels-last (NHWC) memory format"
                             + (" (default)" if DEFAULTS.channels_last else ""))
    layout.add_argument("--contiguous", dest="channels_last", action="store_false",
                        help="use the contiguous (NCHW) memory format"
                             + ("" if DEFAULTS.channels_last else " (default)"))
    parser.set_defaults(channels_last=DEFAULTS.channels_last)
    run.add_argument("--output", metavar="DIR", default=None,
                     help="folder for results.json, learning_curves.png and model.pt "
                          "(default: runs/train-<date>-<time>)")
    run.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def command_train(args):
    output = args.output or os.path.join("runs", time.strftime("train-%Y%m%d-%H%M%S"))
    config = train.TrainConfig(
        dim=args.dim,
        depth=args.depth,
        kernel_size=args.kernel_size,
        patch_size=args.patch_size,
        depthwise=args.depthwise,
        init=args.init,
        epochs=args.epochs,
        train_subset=args.train_subset,
        val_size=args.val_size,
        test_subset=args.test_subset,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=args.augment,
        seed=args.seed,
        data_seed=args.data_seed,
        device=args.device,
        channels_last=args.channels_last,
        data_dir=args.data,
        output_dir=output,
    )
    results = train.train(config, progress=not args.no_progress)
    print(f"test accuracy: {results['test_accuracy']:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------
# sample and plot


def add_covariance_source_arguments(parser):
    source = parser.add_argument_group("covariance (choose one source)")
    choice = source.add_mutually_exclusive_group(required=True)
    choice.add_argument("--bank", metavar="PATH",
                        help="bank file written by 'convcov-fast covariance' or "
                             "covariance.save_bank")
    choice.add_argument("--sigma", type=positive_float,
                        help="width of the closed-form Gaussian covariance, in taps")
    choice.add_argument("--depth", type=positive_int,
                        help="number of layers of a closed-form bank whose width grows from "
                             "--sigma-first to --sigma-last")
    source.add_argument("--layer", type=non_negative_int,
                        help="0-based layer of --bank to use (default: every layer)")
    source.add_argument("--sigma-first", type=positive_float, default=None,
                        help="width of the first layer of --depth, in taps "
                             f"(default: {covariance.SIGMA_FIRST})")
    source.add_argument("--sigma-last", type=positive_float, default=None,
                        help="width of the last layer of --depth, in taps "
                             f"(default: {covariance.SIGMA_LAST})")
    source.add_argument("--kernel-size", type=positive_int, default=None,
                        help="side of the square filters; a --bank of another size is resized "
                             f"(default: {DEFAULT_KERNEL_SIZE}, or the size stored in --bank)")
    source.add_argument("--variance", type=positive_float, default=None,
                        help="mean per-weight variance of closed-form covariances "
                             "(default: 1 / (3 k^2), that of PyTorch's default init)")


def covariance_from_args(args):
    """Return the (d, d) or (L, d, d) covariance and its (kh, kw) that the options select."""
    if args.bank is None and args.layer is not None:
        raise ValueError("--layer selects a layer of --bank, so pass --bank PATH too")
    if args.depth is None and (args.sigma_first is not None or args.sigma_last is not None):
        raise ValueError("--sigma-first and --sigma-last set the widths of a --depth bank, so "
                         "pass --depth N too")
    if args.bank is not None:
        if args.variance is not None:
            raise ValueError("--variance applies to closed-form covariances, not to --bank")
        bank, metadata = covariance.load_bank(args.bank)
        kernel_size = tuple(metadata["kernel_size"])
        if args.layer is not None:
            if args.layer >= bank.shape[0]:
                raise ValueError(
                    f"--layer {args.layer} is out of range: {args.bank} contains "
                    f"{bank.shape[0]} layers (0..{bank.shape[0] - 1})"
                )
            bank = bank[args.layer]
        if args.kernel_size is not None and (args.kernel_size,) * 2 != kernel_size:
            bank = covariance.resize(bank, args.kernel_size, source_kernel_size=kernel_size)
            kernel_size = (args.kernel_size, args.kernel_size)
        return bank, kernel_size

    size = args.kernel_size or DEFAULT_KERNEL_SIZE
    if args.sigma is not None:
        return covariance.gaussian(size, args.sigma, variance=args.variance), (size, size)
    widths = {}
    if args.sigma_first is not None:
        widths["sigma_first"] = args.sigma_first
    if args.sigma_last is not None:
        widths["sigma_last"] = args.sigma_last
    bank = covariance.closed_form(args.depth, size, variance=args.variance, **widths)
    return bank, (size, size)


def save_tensor(path, tensor):
    """Save ``tensor`` with torch.save for a .pt path or numpy.save for a .npy path."""
    suffix = Path(path).suffix
    if suffix == ".pt":
        torch.save(tensor.contiguous(), path)
    elif suffix == ".npy":
        np.save(path, tensor.numpy())
    else:
        raise ValueError(f"output must end in .pt or .npy, got {os.fspath(path)!r}")


def add_sample_arguments(parser):
    parser.add_argument("output", help="file for the filters: .pt (torch.save of a tensor) or .npy")
    parser.add_argument("-n", "--num-filters", type=positive_int, default=64,
                        help="filters per covariance (default: 64)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the filter sampling (default: 0)")
    add_covariance_source_arguments(parser)


def command_sample(args):
    if Path(args.output).suffix not in (".pt", ".npy"):
        raise ValueError(f"output must end in .pt or .npy, got {args.output!r}")
    cov, kernel_size = covariance_from_args(args)
    generator = torch.Generator().manual_seed(args.seed)
    filters = sampling.sample(cov, args.num_filters, generator=generator, kernel_size=kernel_size)
    save_tensor(args.output, filters)
    print(f"wrote filters of shape {tuple(filters.shape)} to {args.output}")
    return 0


def add_plot_arguments(parser):
    parser.add_argument("output", help="PNG file for the figure")
    parser.add_argument("--filters", type=non_negative_int, default=6,
                        help="sample filters drawn next to each covariance; 0 for none "
                             "(default: 6)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the filter sampling (default: 0)")
    add_covariance_source_arguments(parser)


def command_plot(args):
    cov, kernel_size = covariance_from_args(args)
    filters = None
    if args.filters:
        generator = torch.Generator().manual_seed(args.seed)
        filters = sampling.sample(cov, args.filters, generator=generator, kernel_size=kernel_size)
    plots.plot_bank(cov, kernel_size, args.output, filters=filters)
    print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# covariance


def add_covariance_arguments(parser):
    parser.add_argument("checkpoint",
                        help="torch.save file of a state_dict, or of a dict with a 'model' or "
                             "'state_dict' key, such as model.pt from 'convcov-fast train'; read "
                             "with weights_only=True")
    parser.add_argument("output", help="bank file to write")
    parser.add_argument("--layers", metavar="GLOB", action="append", default=None,
                        help="select depthwise weights by state_dict key, for example 'blocks.*'; "
                             "repeatable (default: every 4-D '*.weight' of shape (C, 1, kh, kw) "
                             "with C > 1)")


def command_covariance(args):
    bank, kernel_size, names = train.bank_from_checkpoint(args.checkpoint, patterns=args.layers)
    covariance.save_bank(
        args.output,
        bank,
        kernel_size=kernel_size,
        kind="empirical",
        source=os.path.abspath(args.checkpoint),
        layers=names,
    )
    kh, kw = kernel_size
    print(f"wrote a bank of {len(names)} {kh}x{kw} covariances to {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# bench and study, which live in modules that may be absent


def add_optional_command(subparsers, name, help_text):
    """Add the subcommand of module ``convcov_fast.<name>``, or a stub that explains its absence."""
    try:
        if name == "bench":
            from convcov_fast import bench as module
        else:
            from convcov_fast import study as module
        add_arguments, run = module.add_arguments, module.run
    except (ImportError, AttributeError) as error:
        reason = f"{type(error).__name__}: {error}"
        parser = subparsers.add_parser(name, help=f"{help_text} (unavailable)",
                                       description=f"{help_text}. Unavailable here: {reason}")
        parser.set_defaults(func=lambda args: _unavailable(name, reason),
                            ignores_extra_arguments=True)
        return
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    add_arguments(parser)
    parser.set_defaults(func=run)


def _unavailable(name, reason):
    print(f"error: the {name} command is unavailable because convcov_fast.{name} could not be "
          f"loaded ({reason})", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="convcov-fast",
        description="Covariance-based initialization of depthwise convolution filters, "
                    "and fast convolution with frozen filters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands = (
        ("train", "train a ConvMixer on Fashion-MNIST and report its test accuracy",
         add_train_arguments, command_train),
        ("sample", "sample filters from a covariance and save them",
         add_sample_arguments, command_sample),
        ("covariance", "compute a bank of filter covariances from a saved model",
         add_covariance_arguments, command_covariance),
        ("plot", "draw a covariance bank and sample filters to a PNG",
         add_plot_arguments, command_plot),
    )
    for name, help_text, add_arguments, command in commands:
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(func=command)
    add_optional_command(subparsers, "bench", "time the depthwise convolution backends")
    add_optional_command(subparsers, "study", "compare filter initializations by training runs")
    return parser


def main(argv=None):
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only the stub of an unavailable command ignores its arguments, so that it can explain
    # why the command is missing instead of listing the options it does not know.
    if extra and not getattr(args, "ignores_extra_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
