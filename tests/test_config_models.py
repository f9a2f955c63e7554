"""The configuration on pydantic v2 (pipeline/config.py): results hashes unchanged from the
hand-written loader, and pydantic's errors worded as the loader's (file, dotted key, list
index, what to write instead)."""
import copy
import dataclasses
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# cfg.hash() of each shipped config as the hand-written loader computed it (main at 2a9cca6,
# before pydantic): job outputs are guarded by this hash, so a new loader must not move it.
# Since the clean gate these are the hashes with evaluation.attack_misclassified: true (every
# sample attacked, the protocol those outputs were made with) and cascade false (the DiffPure
# configs' preset cascades by default since); GATED_HASHES: the defaults
SHIPPED_HASHES = {
    "adp_cifar10.yaml": "810bbf86471a9f3c",
    "adp_mnist.yaml": "afe3fda574f32e74",
    "adp_mnist_cpu.yaml": "9d1fc79c008533d2",
    "apudae_mnist.yaml": "17637343542da3b9",
    "demo_digits.yaml": "77acdd9a443d4fb4",
    "diffpure_cifar10.yaml": "42998c7cb6ce2e02",
    "diffpure_digits.yaml": "c0904183a29a970d",
    "diffpure_imagenet.yaml": "b9bd7dc59f8e26f1",
    "diffpure_mnist.yaml": "46d52318d41de11a",   # added after the move to pydantic: pinned as first hashed
    "dip_mnist.yaml": "2f95c622210e58ef",
    "ebm_cifar10.yaml": "c285faf230192fc6",
    "ebm_digits.yaml": "704f58bbb2605bd0",
    "ebm_mnist.yaml": "ce1a5260c04201aa",
    "imagenet_resnet50.yaml": "81e821e41fffe320",
    "mnist_undefended_sweep.yaml": "db9c20cb7113f76e",
}
# the same configs as shipped (the clean gate on: verdicts of clean-wrong samples change, so does the hash)
GATED_HASHES = {
    "adp_cifar10.yaml": "353fedfb9a2b85f0",
    "adp_mnist.yaml": "1009972d03c9addd",
    "adp_mnist_cpu.yaml": "301b5e64747f59ce",
    "apudae_mnist.yaml": "2eb8681b38166f84",
    "demo_digits.yaml": "3db13d20d8d91f5e",
    "diffpure_cifar10.yaml": "7dbe375cffa54b57",   # diffpure2022: cascade (auto)
    "diffpure_digits.yaml": "789102aea0f29b62",
    "diffpure_imagenet.yaml": "54fdb79486f56074",   # diffpure2022: cascade (auto)
    "diffpure_mnist.yaml": "c75bab9c45758d19",
    "dip_mnist.yaml": "1b4a6c0a591a8ed8",
    "ebm_cifar10.yaml": "c9ec1d966250613d",
    "ebm_digits.yaml": "c9248146b768668d",
    "ebm_mnist.yaml": "d5d146c916ba88a4",
    "imagenet_resnet50.yaml": "2d017a6c47e29f7b",
    "mnist_undefended_sweep.yaml": "93d292150d9010a2",
}
# jobs that reach the hash's optional parts (corpus, precision) and fractions, hashed by the same old loader
CORPUS_JOB = {"job": {"name": "c", "output": "o", "stages": ["purify"]}, "data": {"shards": "s-{0..3}.tar"},
              "purifier": {"name": "gaussian", "params": {"sigma": "1/4"}},
              "corpus": {"resize": 32, "crop": True, "jpeg_quality": 90, "channels": 3, "max_batch_pixels": 1024}}
BF16_JOB = {"job": {"name": "t", "output": "o", "seed": 7},
            "data": {"shards": ["a.tar", "b.tar"], "max_samples_per_shard": 5},
            "classifier": {"name": "small_cnn", "params": {}}, "purifier": {"name": "none"},
            "attacks": [{"name": "pgd", "params": {"eps": "8/255", "steps": 3}, "gradient": "bpda", "eot": 2},
                        {"name": "rfgsm", "params": {"eps": 0.1, "alpha": "0.5/255"}}],
            "evaluation": {"runs": 3, "cascade": True, "decision": "vote", "confirm_draws": 5, "precision": "bf16"}}

MINIMAL = {"job": {"name": "j", "output": "runs/j"}, "data": {"shards": "s-{0..1}.tar"},
           "classifier": {"name": "small_cnn"},
           "attacks": [{"name": "pgd", "params": {"eps": "8/255"}} for _ in range(3)]}


def _attacking_every_sample(cfg: config.Config) -> config.Config:
    return dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, attack_misclassified=True))


def _as_before(cfg: config.Config) -> config.Config:
    """The protocol the shipped configs had before the clean gate and `cascade: auto` (none of
    them sets cascade; AutoAttack's presets now cascade by default)."""
    return dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, attack_misclassified=True,
                                                                    cascade=False))


def test_every_shipped_config_hashes_as_before():
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert shipped == sorted(SHIPPED_HASHES) == sorted(GATED_HASHES), "a config was added or removed: put its hash here"
    for name, expected in SHIPPED_HASHES.items():
        cfg = config.load(ROOT / "configs" / name, check_components=False)
        assert _as_before(cfg).hash() == expected, name
        assert cfg.hash() == GATED_HASHES[name], name


def test_corpus_and_bf16_jobs_hash_as_before():
    assert config.from_dict(copy.deepcopy(CORPUS_JOB), check_components=False).hash() == "c99f11fc21ff6f65"
    bf16 = config.from_dict(copy.deepcopy(BF16_JOB), check_components=False)
    assert _attacking_every_sample(bf16).hash() == "9a81598a032c5a9e" and bf16.hash() == "55907df460979c92"


def test_the_clean_gate_moves_the_hash_only_where_it_gates():
    gated = config.from_dict(copy.deepcopy(BF16_JOB), check_components=False)
    split = config.from_dict({**copy.deepcopy(BF16_JOB), "job": {**BF16_JOB["job"], "stages": ["attack", "purify"]}},
                             check_components=False)
    assert split.hash() == _attacking_every_sample(split).hash() != gated.hash()   # attack + purify never gate
    bare = config.from_dict({**copy.deepcopy(BF16_JOB), "attacks": []}, check_components=False)
    assert bare.hash() == _attacking_every_sample(bare).hash()                      # nothing to attack


def _error(override: str) -> str:
    data = config.apply_overrides(copy.deepcopy(MINIMAL), [override])
    with pytest.raises(ConfigError) as err:
        config.from_dict(data, "job.yaml", check_components=False)
    return str(err.value)


@pytest.mark.parametrize("override, message", [
    ("job.sede=1", "job.yaml: unknown key job.sede; did you mean 'seed'? (allowed: name, output, seed, stages)"),
    ("attacks.2.eott=2", "job.yaml: unknown key attacks[2].eott; did you mean 'eot'? "
                         "(allowed: name, params, gradient, eot, surrogate)"),
    ("attacks.2.eot=0", "job.yaml: attacks[2].eot: must be ≥ 1"),
    ("source=x.yaml", "job.yaml: unknown key source (allowed: job, data, classifier, purifier, attacks, "
                      "evaluation, cluster, faults, corpus)"),
    ("job.seed=-1", "job.yaml: job.seed: must be in [0, 2^63)"),
    ("job.seed=9223372036854775808", "job.yaml: job.seed: must be in [0, 2^63)"),
    ("job.name=' '", "job.yaml: job.name: must not be empty"),
    ("job.stages=[]", "job.yaml: job.stages: must name at least one stage"),
    ("data.shards=7", "job.yaml: data.shards: expected a list, got int 7"),
    ("data.batch_size=2.0", "job.yaml: data.batch_size: expected an integer, got 2.0"),
    ("evaluation.runs=true", "job.yaml: evaluation.runs: expected an integer, got True"),
    ("evaluation.cascade=1", "job.yaml: evaluation.cascade: expected true/false or auto, got 1"),
    ("evaluation.confirm_draws=0", "job.yaml: evaluation.confirm_draws: must be ≥ 1 or null"),
    ("evaluation.max_rows=0", "job.yaml: evaluation.max_rows: must be ≥ 1 or auto"),
    ("evaluation.max_rows=many", "job.yaml: evaluation.max_rows: expected an integer or auto, got 'many'"),
    ("evaluation.check_samples=-1", "job.yaml: evaluation.check_samples: must be ≥ 0"),
    ("cluster.num_workers=2.5", "job.yaml: cluster.num_workers: expected an integer or auto, got 2.5"),
    ("cluster.gpus_per_worker=-1", "job.yaml: cluster.gpus_per_worker: must be ≥ 0 or auto"),
    ("cluster.gpus_per_worker=1/0", "job.yaml: cluster.gpus_per_worker: '1/0' divides by zero"),
    ("cluster.cpus_per_worker=0/2", "job.yaml: cluster.cpus_per_worker: must be > 0"),
    ("cluster.lease_timeout_s=20", "job.yaml: cluster.lease_timeout_s: must be ≥ 3 × cluster.lease_heartbeat_s "
                                   "(a live driver must renew well before it expires)"),
    # a nullable section names the key inside it (the hand-written loader named only the section)
    ("classifier.name=3", "job.yaml: classifier.name: expected a string, got 3"),
    ("corpus={jpeg_quality: 101}", "job.yaml: corpus.jpeg_quality: must be in [1, 100]"),
    ("corpus={channels: true}", "job.yaml: corpus.channels: expected an integer or null, got True"),
    ("corpus={channels: 2}", "job.yaml: corpus.channels: 2 is not one of [1, 3] or null"),
    ("corpus={crop: true}", "job.yaml: corpus.crop: needs corpus.resize"),
    ("faults=[{shard: a, mode: raise}]", "job.yaml: missing required key faults[0].marker_dir"),
    # YAML types JSON lacks are refused where they stand (the hand-written loader: at typed keys only)
    ("job.output=2024-01-01", "job.yaml: job.output: expected a string, number, true/false or null, "
                              "got datetime.date(2024, 1, 1) (quote it for text)"),
])
def test_errors_name_the_file_the_key_and_the_fix(override, message):
    assert _error(override) == message


def test_what_the_loader_reads_beyond_plain_types():
    data = config.apply_overrides(copy.deepcopy(MINIMAL), [
        "job.seed=9223372036854775807", "job.stages=attack", "evaluation.max_rows=auto",
        "cluster.gpus_per_worker=1/4", "cluster.shard_timeout_s=120"])
    cfg = config.from_dict(data, "job.yaml", check_components=False)
    assert cfg.job.stages == ("attack",) and cfg.data.shards == ("s-{0..1}.tar",)
    assert cfg.evaluation.max_rows == "auto" and cfg.evaluation.check_samples == 16
    assert cfg.cluster.gpus_per_worker == 0.25 and cfg.cluster.shard_timeout_s == 120.0
    assert isinstance(cfg.cluster.shard_timeout_s, float)
    assert cfg.attacks[0].params["eps"] == 8 / 255      # the attack's float parameter, from its fraction


def test_copies_are_checked_and_keep_the_source():
    """`dataclasses.replace` (run/slurm.py, benchmarks) builds a checked copy, source kept."""
    cfg = config.from_dict(copy.deepcopy(MINIMAL), "job.yaml", check_components=False)
    copy_ = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address="ray://head:10001"))
    assert copy_.source == "job.yaml" and copy_.hash() == cfg.hash() and copy_.cluster.address == "ray://head:10001"
    with pytest.raises(ValueError, match="num_workers"):
        dataclasses.replace(cfg.cluster, num_workers=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.evaluation.runs = 2
