"""Training our small models to checkpoints (used by jobs/train_* and by the demo)."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pipeline import checkpoints, datasets, training
from pipeline.seeding import config_seed
from pipeline.classifiers import small_cnn
from pipeline.purifiers.nets import small_dae

log = logging.getLogger(__name__)


def _train_data(source: str, split: str, path: str | None):
    images, labels, _ = datasets.load_split(source, split, path)
    return datasets.to_float_nchw(images), torch.from_numpy(labels)


def _seeded(seed: int, name: str, ctor, **kwargs):
    """Build a network with its initial weights drawn from the job seed, not the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config_seed(seed, "init", name))
        return ctor(**kwargs)


def train_small_cnn(out: str, source: str = "digits", split: str = "train", path: str | None = None,
                    epochs: int = 30, seed: int = 0, width: int = 32) -> dict[str, Any]:
    x, y = _train_data(source, split, path)
    model = _seeded(seed, "small_cnn", small_cnn.make, in_channels=x.shape[1], width=width)
    t0 = time.time()
    losses = training.train_classifier(model, x, y, epochs=epochs, seed=seed)
    meta = {"source": source, "split": split, "epochs": epochs, "seed": seed, "loss": losses,
            "train_accuracy": training.accuracy(model, x, y), "seconds": time.time() - t0}
    checkpoints.save(out, small_cnn.ARCH, {"in_channels": x.shape[1], "width": width}, model.state_dict(), meta)
    log.info("classifier → %s: train accuracy %.3f in %.1fs", out, meta["train_accuracy"], meta["seconds"])
    return meta


def train_small_dae(out: str, source: str = "digits", split: str = "train", path: str | None = None,
                    epochs: int = 30, seed: int = 0, width: int = 32,
                    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)) -> dict[str, Any]:
    x, _ = _train_data(source, split, path)
    net = _seeded(seed, "small_dae", small_dae.SmallDAE, in_channels=x.shape[1], width=width)
    t0 = time.time()
    losses = training.train_denoiser(net, x, sigmas=sigmas, epochs=epochs, seed=seed)
    meta = {"source": source, "split": split, "epochs": epochs, "seed": seed, "loss": losses,
            "sigmas": list(sigmas), "seconds": time.time() - t0}
    checkpoints.save(out, small_dae.ARCH, {"in_channels": x.shape[1], "width": width}, net.state_dict(), meta)
    log.info("denoiser → %s: final loss %.5f in %.1fs", out, losses[-1], meta["seconds"])
    return meta
