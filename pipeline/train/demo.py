"""The embedded default job: real handwritten digits bundled with scikit-learn, a small CNN
and a denoising-autoencoder purifier trained here (cached), PGD, Parquet, a summary."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from pipeline.io import storage
from pipeline.io.make_shards import make_shards
from pipeline.train import recipes as models

log = logging.getLogger(__name__)


def demo_config(workdir: str, shard_pattern: str, workers: int) -> dict:
    models_dir = Path(workdir, "models")
    return {
        "job": {"name": "demo-digits", "output": str(Path(workdir, "results")), "seed": 0},
        "data": {"shards": shard_pattern, "batch_size": 128},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": str(models_dir / "digits_cnn.pt")}},
        "purifier": {"name": "dae", "params": {"checkpoint": str(models_dir / "digits_dae.pt")}},
        # one ε, three kinds of attack; the headline is each sample's worst case over them
        "attacks": [
            # preprocessor-blind: PGD against the bare classifier, then purified (a transfer attack)
            {"name": "pgd", "params": {"eps": 0.2, "steps": 20, "step_size": 0.02, "norm": "linf"},
             "gradient": "classifier"},
            # adaptive: full gradient through the (differentiable) purifier
            {"name": "apgd", "params": {"eps": 0.2, "steps": 50, "norm": "linf"}, "gradient": "auto"},
            # gradient-free: the check flags the job if it beats every gradient attack
            {"name": "square", "params": {"eps": 0.2, "n_queries": 1000, "norm": "linf"}, "gradient": "auto"},
        ],
        "evaluation": {"runs": 1},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1},
    }


def _drop_stale(path: Path, kind: str, name: str) -> None:
    """A cached model that no longer loads (an older architecture) is retrained."""
    from pipeline.io.checkpoints import CheckpointError
    from pipeline.registry import CLASSIFIERS, PURIFIERS

    if path.exists():
        try:
            (CLASSIFIERS if kind == "classifier" else PURIFIERS).build(name, checkpoint=str(path))
        except CheckpointError as err:
            log.warning("cached %s does not load (%s): retraining", path, err)
            path.unlink()


def prepare(workdir: str = "runs/demo", workers: int = 2, epochs: int = 40) -> str:
    """Shards and models if not there yet (cached); returns the path of the job's YAML."""
    wd = Path(workdir)
    shard_dir = wd / "shards"
    if not (shard_dir / "index.json").exists():
        doc = make_shards("digits", str(shard_dir), split="test", samples_per_shard=90)
        log.info("digits test split: %d samples in %d shards", doc["total_samples"], len(doc["shards"]))
    import json

    index = json.loads((shard_dir / "index.json").read_text())
    n = len(index["shards"])
    pattern = str(shard_dir / (f"shard-{{000000..{n - 1:06d}}}.tar" if n > 1 else "shard-000000.tar"))
    # one thread: float reductions then run in one order, so the cached models (and the
    # demo's figures) are the same on every machine with this torch build
    import torch

    torch.set_num_threads(1)
    cnn, dae = wd / "models" / "digits_cnn.pt", wd / "models" / "digits_dae.pt"
    _drop_stale(cnn, "classifier", "small_cnn")
    _drop_stale(dae, "purifier", "dae")
    if not cnn.exists():
        log.info("training the digits classifier (cached at %s)", cnn)
        models.train_small_cnn(str(cnn), "digits", "train", epochs=epochs)
    if not dae.exists():
        log.info("training the denoising autoencoder (cached at %s)", dae)
        models.train_small_dae(str(dae), "digits", "train", epochs=epochs)
    cfg_path = wd / "demo.yaml"
    storage.put_text(str(cfg_path), yaml.safe_dump(demo_config(workdir, pattern, workers), sort_keys=False))
    return str(cfg_path)
