"""Scaffolding every jobs/train_* script shares: the data and run flags (spelled one way),
loading a named split as tensors, seeded network initialisation, saving a checkpoint.

Data flags: --data {digits,mnist,cifar10}, --path (dataset folder), --split (a named split
of pipeline.io.datasets.load_split), --limit; jobs with a held-out check add --eval-split
and --eval-count. Only the MNIST *test* files are stored here, so MNIST defaults to
t10k-fit (images 0–7,999) for training and t10k-holdout (8,000–9,999) for checks.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pipeline.io import checkpoints, datasets
from pipeline.seeding import config_seed

log = logging.getLogger(__name__)

SOURCES = ("digits", "mnist", "cifar10")
# (training split, held-out split) when --split / --eval-split are not given
DEFAULT_SPLITS = {"digits": ("train", "test"), "mnist": ("t10k-fit", "t10k-holdout"), "cifar10": ("train", "test")}

M = TypeVar("M", bound=nn.Module)


def add_data_args(parser: argparse.ArgumentParser, *, sources: tuple[str, ...] = SOURCES,
                  default: str | None = "digits", limit: bool = True, eval_count: int | None = None) -> None:
    """--data, --path, --split (and --limit; with `eval_count`, --eval-split and --eval-count)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=sources, default=default,
                   help="data set" + ("" if default else " (default: the one recorded in the checkpoint)"))
    g.add_argument("--path", default=None,
                   help="data set folder: MNIST idx files (default ADVPURE_MNIST_DIR or ../shared/data/mnist), "
                        "CIFAR-10 python batches")
    splits = ", ".join(f"{k}: {v[0]}" for k, v in DEFAULT_SPLITS.items() if k in sources)
    g.add_argument("--split", default=None, help=f"named training split (default {splits}; "
                   "digits train/test/all, mnist train/t10k/t10k-fit/t10k-holdout, cifar10 train/test)")
    if limit:
        g.add_argument("--limit", type=int, default=0, help="train on at most this many images (0: all)")
    if eval_count is not None:
        held = ", ".join(f"{k}: {v[1]}" for k, v in DEFAULT_SPLITS.items() if k in sources)
        g.add_argument("--eval-split", default=None, help=f"named split for the held-out check (default {held})")
        g.add_argument("--eval-count", type=int, default=eval_count,
                       help="images of --eval-split for the held-out check (0: none)")


def add_run_args(parser: argparse.ArgumentParser, *, log_every: int | None = None) -> None:
    """--seed, --threads (and --log-every)."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="job seed: initial weights, batch order, noise")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    if log_every is not None:
        g.add_argument("--log-every", type=int, default=log_every, help="log the loss every this many steps")


def setup(args: argparse.Namespace) -> None:
    """Logging to stderr at INFO, and the torch thread count if --threads was given."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def splits(args: argparse.Namespace) -> tuple[str, str]:
    """(training split, held-out split) of the job: the flags, else the data set's defaults."""
    train, held = DEFAULT_SPLITS[args.data]
    return args.split or train, getattr(args, "eval_split", None) or held


def load_images(source: str, split: str, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, C, H, W] in [0, 1], labels int64 [N]) of a named split."""
    images, labels, _ = datasets.load_split(source, split, path)
    return datasets.to_float_nchw(images), torch.from_numpy(labels)


def load_or_exit(source: str, split: str, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`load_images`, but a missing data set or unknown split ends the job with its reason
    (command-line scaffolding, not library code)."""
    try:
        return load_images(source, split, path)
    except datasets.DatasetError as err:
        raise SystemExit(f"cannot load {source} split {split!r}: {err}") from None


def load_data(args: argparse.Namespace, held_out: bool = False) -> tuple[torch.Tensor, ...]:
    """The job's (images, labels) of --split, cut to its first --limit; with `held_out` also
    the first --eval-count images of --eval-split: (images, labels, held-out images)."""
    train_split, held_split = splits(args)
    x, y = load_or_exit(args.data, train_split, args.path)
    if getattr(args, "limit", 0):
        x, y = x[:args.limit], y[:args.limit]
    if not held_out:
        return x, y
    held = load_or_exit(args.data, held_split, args.path)[0][:args.eval_count] if args.eval_count > 0 else x[:0]
    return x, y, held


def seeded_init(ctor: Callable[..., M], seed: int, *purpose: object, **kwargs: Any) -> M:
    """`ctor(**kwargs)` with its initial weights drawn from config_seed(seed, *purpose), not
    from (and without disturbing) the global RNG: the job seed alone fixes the network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config_seed(seed, *purpose))
        return ctor(**kwargs)


def save(out: str, arch: str, arch_params: dict, net: nn.Module, meta: dict,
         input_shape: Sequence[int] | None = None) -> None:
    """An advpure checkpoint (pipeline.io.checkpoints: arch, params, weights, meta) at a local
    path or s3:// URL; the registry builders load it by `arch`. `input_shape` (C, H, W) of
    the training images goes into meta["input_shape"]: jobs check their data against it."""
    if input_shape is not None:
        meta = {**meta, checkpoints.INPUT_SHAPE: [int(v) for v in input_shape]}
    checkpoints.save(out, arch, arch_params, net.state_dict(), meta)
    log.info("saved %s (%s %s)", out, arch, arch_params)


def first_last(values: list[float], most: int = 50) -> tuple[int, float, float]:
    """(k, mean of the first k, mean of the last k) with k a tenth of the run, 1 to `most`:
    a loss summary that ignores single-batch noise."""
    k = max(1, min(most, len(values) // 10))
    return k, sum(values[:k]) / k, sum(values[-k:]) / k
