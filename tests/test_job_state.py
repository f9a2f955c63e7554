"""What identifies an output's job: its config hash and its data (shard names and checksums).
No Ray: `job_runner.check_job_state` against outputs whose commits are written directly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.io.make_shards import make_shards
from pipeline.run import commit, data_identity, driver, job_runner
from tests.conftest import job_dict

MODELS = {"cnn": "cnn.pt", "dae": "dae.pt"}   # never loaded: components are not checked here


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two data sets with the same shard names and other images (test and train splits)."""
    root = tmp_path_factory.mktemp("sets")
    a = make_shards("digits", str(root / "a"), split="test", samples_per_shard=120)
    b = make_shards("digits", str(root / "b"), split="train", samples_per_shard=120, limit=360)
    return a["pattern"], b["pattern"]


def _cfg(pattern: str, out: Path, **over) -> config.Config:
    return config.from_dict(job_dict(pattern, MODELS, str(out), **over), "job.yaml", check_components=False)


def _start(cfg: config.Config) -> list[driver.ShardState]:
    states = driver.plan_shards(cfg)
    job_runner.check_job_state(cfg, states)
    return states


def _commit_one(cfg: config.Config, sid: str = "shard-000000") -> None:
    commit.commit_records(cfg.job.output, "evaluate", sid, [], {"config_hash": cfg.hash(), "samples": 0})


def test_the_same_data_resumes_and_its_identity_comes_from_the_index(two_sets, tmp_path):
    cfg = _cfg(two_sets[0], tmp_path / "out")
    _start(cfg)
    _commit_one(cfg)
    data = json.loads((tmp_path / "out" / "job.json").read_text())["data"]
    index = {e["name"]: e for e in json.loads(Path(two_sets[0]).parent.joinpath("index.json").read_text())["shards"]}
    entry = index["shard-000000.tar"]
    assert data["shard-000000"] == {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    # record-irrelevant settings (batch size, workers) change neither the hash nor the data
    _start(_cfg(two_sets[0], tmp_path / "out", data={"shards": two_sets[0], "batch_size": 7},
                cluster={"num_workers": 1}))


def test_other_images_under_the_same_shard_names_are_refused(two_sets, tmp_path):
    cfg = _cfg(two_sets[0], tmp_path / "out")
    _start(cfg)
    _commit_one(cfg)
    with pytest.raises(ConfigError) as err:
        _start(_cfg(two_sets[1], tmp_path / "out"))
    msg = str(err.value)
    assert msg.startswith("job.yaml: output ") and "holds results for other data than data.shards names" in msg
    # only the committed shard holds results of the old data: the others would be run anew
    assert "1 shard(s) changed (other bytes under the same name): shard-000000; resume with the data" in msg
    assert f"remove {tmp_path / 'out'} to start over" in msg


def test_a_repaired_shard_without_results_resumes(two_sets, tmp_path):
    ours, a, b = tmp_path / "ours", Path(two_sets[0]).parent, Path(two_sets[1]).parent
    shutil.copytree(a, ours)
    (ours / "index.json").unlink()          # the files identify themselves
    shutil.copy(b / "shard-000002.tar", ours / "shard-000002.tar")   # a damaged shard, quarantined
    cfg = _cfg(str(ours / Path(two_sets[0]).name), tmp_path / "out")
    _start(cfg)
    _commit_one(cfg)
    shutil.copy(a / "shard-000002.tar", ours / "shard-000002.tar")   # repaired: no results of it to mix
    _start(cfg)
    shutil.copy(b / "shard-000000.tar", ours / "shard-000000.tar")
    with pytest.raises(ConfigError, match=r"1 shard\(s\) changed \(other bytes under the same name\): shard-000000;"):
        _start(cfg)


def test_added_and_removed_shards_are_named(two_sets, tmp_path):
    first_two = two_sets[0].replace("{000000..000002}", "{000000..000001}")
    cfg = _cfg(first_two, tmp_path / "out")
    _start(cfg)
    _commit_one(cfg)
    with pytest.raises(ConfigError, match=r"1 shard\(s\) added: shard-000002"):
        _start(_cfg(two_sets[0], tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"1 shard\(s\) removed: shard-000001"):
        _start(_cfg(first_two.replace("{000000..000001}", "000000"), tmp_path / "out"))


def test_without_an_index_the_files_identify_themselves_and_a_copy_still_resumes(two_sets, tmp_path):
    for name, src in (("a", two_sets[0]), ("b", two_sets[1])):
        shutil.copytree(Path(src).parent, tmp_path / name)
        (tmp_path / name / "index.json").unlink()
    pattern = str(tmp_path / "a" / Path(two_sets[0]).name)
    cfg = _cfg(pattern, tmp_path / "out")
    _start(cfg)
    _commit_one(cfg)
    data = json.loads((tmp_path / "out" / "job.json").read_text())["data"]
    assert set(data["shard-000000"]) == {"bytes", "ends_sha256"}
    shutil.copytree(tmp_path / "a", tmp_path / "copy")        # new mtimes, same bytes
    _start(_cfg(str(tmp_path / "copy" / Path(two_sets[0]).name), tmp_path / "out"))
    with pytest.raises(ConfigError, match="changed"):
        _start(_cfg(str(tmp_path / "b" / Path(two_sets[0]).name), tmp_path / "out"))


def test_an_output_with_nothing_committed_is_taken_over_by_a_corrected_config(two_sets, tmp_path):
    cfg = _cfg(two_sets[0], tmp_path / "out", attacks=[{"name": "pgd", "params": {"eps": 0.5}}])
    _start(cfg)   # then the job aborted before its first commit
    fixed = _cfg(two_sets[0], tmp_path / "out", attacks=[{"name": "pgd", "params": {"eps": "8/255"}}])
    _start(fixed)
    assert json.loads((tmp_path / "out" / "job.json").read_text())["config_hash"] == fixed.hash()
    _commit_one(fixed)
    with pytest.raises(ConfigError, match=f"holds results of config hash {fixed.hash()}"):
        _start(cfg)
    _start(_cfg(two_sets[0], tmp_path / "other"))   # other data with nothing committed: taken over too
    _start(_cfg(two_sets[1], tmp_path / "other"))


def test_identities_agree_on_the_fields_both_have():
    assert data_identity.same({"sha256": "a", "bytes": 3}, {"ends_sha256": "x", "bytes": 3})
    assert not data_identity.same({"sha256": "a", "bytes": 3}, {"ends_sha256": "x", "bytes": 4})
    assert not data_identity.same({"etag": '"1"'}, {"etag": '"2"'})
    d = data_identity.diff({f"s{i}": {"bytes": 1} for i in range(8)}, {f"s{i}": {"bytes": 2} for i in range(8)})
    assert d.describe() == "8 shard(s) changed (other bytes under the same name): s0, s1, s2, s3, s4 and 3 more"


def test_an_output_made_before_the_clean_gate_says_how_to_resume_it(two_sets, tmp_path):
    before = _cfg(two_sets[0], tmp_path / "out", evaluation={"attack_misclassified": True})
    _start(before)
    _commit_one(before)
    gated = _cfg(two_sets[0], tmp_path / "out")   # today's default: the gate on, another hash
    assert gated.hash() != before.hash()
    with pytest.raises(ConfigError, match="made with evaluation.attack_misclassified: true .*: set it to resume them"):
        _start(gated)
    _start(before)   # the same protocol resumes
    other = _cfg(two_sets[0], tmp_path / "out", evaluation={"runs": 3})
    with pytest.raises(ConfigError) as err:   # any other change: no such advice
        _start(other)
    assert "attack_misclassified" not in str(err.value)


def test_an_autoattack_output_made_before_the_presets_cascade_says_how_to_resume_it(two_sets, tmp_path):
    attacks = [{"preset": "autoattack_rand", "overrides": {"steps": 2}}]
    before = _cfg(two_sets[0], tmp_path / "out", attacks=attacks,
                  evaluation={"attack_misclassified": True, "cascade": False})
    _start(before)
    _commit_one(before)
    now = _cfg(two_sets[0], tmp_path / "out", attacks=attacks)
    assert now.evaluation.cascade is True   # auto: AutoAttack runs its attacks as a cascade
    with pytest.raises(ConfigError, match="evaluation.attack_misclassified: true and evaluation.cascade: false"):
        _start(now)
