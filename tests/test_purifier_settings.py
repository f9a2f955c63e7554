"""Purifier settings: one frozen, validated dataclass per purifier (pipeline.purifiers.base)."""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from pipeline import config
from pipeline.config import ConfigError
from pipeline.purifiers import steps
from pipeline.purifiers.adp import ADPSettings
from pipeline.purifiers.apudae import APuDAESettings
from pipeline.purifiers.base import Purified, PurifierSettings, SettingsError
from pipeline.purifiers.dip import DIPSettings
from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings
from pipeline.purifiers.langevin_ebm import LangevinEBMSettings
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


def registered() -> list[tuple[str, type]]:
    return [(name, PURIFIERS.settings_entry(name).settings) for name in PURIFIERS.names()]


# ---------------------------------------------------------------- every purifier follows the pattern

@pytest.mark.parametrize("name", PURIFIERS.names())
def test_every_purifier_registers_a_settings_class_and_build_checkpoint_settings(name):
    entry = PURIFIERS.settings_entry(name)
    assert entry is not None, f"purifier {name!r} registered without settings="
    assert issubclass(entry.settings, PurifierSettings)
    assert entry.settings.__dataclass_params__.frozen
    assert list(inspect.signature(PURIFIERS.get(name)).parameters) == ["checkpoint", "settings"]


@pytest.mark.parametrize("name, cls", registered())
def test_every_field_has_a_default_or_is_documented_as_required_and_is_documented(name, cls):
    doc = inspect.getdoc(cls) or ""
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        line = next((ln for ln in doc.splitlines() if ln.strip().startswith(f"{f.name} (")), None)
        assert line is not None, f"{cls.__name__}.{f.name} is not documented in its docstring"
        assert has_default or "required" in line, f"{cls.__name__}.{f.name}: no default and not documented as required"


@pytest.mark.parametrize("name, cls", registered())
def test_defaults_round_trip_through_record_and_json(name, cls):
    s = cls()
    rec = s.record()
    assert set(rec) == {f.name for f in dataclasses.fields(cls)}
    assert cls.from_params(json.loads(json.dumps(rec)), "purifier.params") == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(s, "x", 1) if not rec else setattr(s, next(iter(rec)), None)


@pytest.mark.parametrize("cls, changes", [
    (ADPSettings, {"sigma": 0.1, "max_iter": 3, "noise_type": "binary", "net": {"ngf": 8}, "checkpoint_segment": 0}),
    (DIPSettings, {"down": [8, 8], "up": [4, 4], "skip": [2, 1], "betas": [0.5, 0.9], "detection": "last_switch"}),
    (APuDAESettings, {"variant": "distance", "mu": 1.0, "sigma": 0.5, "steps": 4, "noise_clip": [0, 1]}),
    (LangevinEBMSettings, {"steps": 7, "eps": 0, "clip_output": False}),
    (GaussianSettings, {"sigma": 1}),
])
def test_changed_settings_round_trip(cls, changes):
    s = cls.from_params(changes, "purifier.params")
    assert cls.from_params(json.loads(json.dumps(s.record())), "purifier.params") == s
    assert hash(s) == hash(cls.from_params(s.record()))        # frozen and hashable, tuples not lists


# ---------------------------------------------------------------- from_params errors

@pytest.mark.parametrize("cls, params, message", [
    (ADPSettings, {"max_itr": 3}, "purifier.params.max_itr: unknown setting; did you mean 'max_iter'?"),
    (ADPSettings, {"colour": 3}, "purifier.params.colour: unknown setting (allowed: sigma, max_iter,"),
    (ADPSettings, {"max_iter": 2.5}, "purifier.params.max_iter: expected an integer, got 2.5"),
    (ADPSettings, {"max_iter": True}, "purifier.params.max_iter: expected an integer, got True"),
    (ADPSettings, {"sigma": "0.25"}, "purifier.params.sigma: expected a number, got '0.25'"),
    (ADPSettings, {"sigma": -0.1}, "purifier.params.sigma: must be ≥ 0, got -0.1"),
    (ADPSettings, {"noise_type": "uniform"}, "purifier.params.noise_type: must be one of 'gaussian', 'binary'"),
    (ADPSettings, {"alpha_min": 0.5}, "purifier.params.alpha_max: must be ≥ alpha_min (0.5), got 0.1"),
    (ADPSettings, {"regrid_each_step": 1}, "purifier.params.regrid_each_step: expected true/false, got 1"),
    (ADPSettings, {"net": [1, 2]}, "purifier.params.net: expected a mapping or null, got [1, 2]"),
    (DIPSettings, {"iteratons": 3}, "purifier.params.iteratons: unknown setting; did you mean 'iterations'?"),
    (DIPSettings, {"iterations": 0}, "purifier.params.iterations: must be ≥ 1, got 0"),
    (DIPSettings, {"down": [8, "x"]}, "purifier.params.down[1]: expected an integer, got 'x'"),
    (DIPSettings, {"betas": [0.9]}, "purifier.params.betas: expected a list of 2, got [0.9]"),
    (DIPSettings, {"down": [8, 8], "skip": [1, 2, 3]}, "purifier.params.skip: must be an integer or a list of 2"),
    (DIPSettings, {"kernel": 4}, "purifier.params.kernel: must be odd and ≥ 1, got 4"),
    (DIPSettings, {"fallback": "none"}, "purifier.params.fallback: must be one of 'last', 'input', got 'none'"),
    (APuDAESettings, {"sigma": 0}, "purifier.params.sigma: must be > 0 or null, got 0.0"),
    (LangevinEBMSettings, {"steps": -1}, "purifier.params.steps: must be ≥ 0, got -1"),
])
def test_from_params_errors_name_the_dotted_key(cls, params, message):
    with pytest.raises(SettingsError) as err:
        cls.from_params(params, "purifier.params")
    assert message in str(err.value)


def test_int_is_a_float_and_lists_become_tuples():
    s = ADPSettings.from_params({"sigma": 1, "delta": 1}, "p")
    assert s.sigma == 1.0 and isinstance(s.sigma, float)
    d = DIPSettings.from_params({"down": [8, 8], "skip": 2}, "p")
    assert d.down == (8, 8) and d.skip == 2 and d.record()["down"] == [8, 8]


def test_settings_built_in_code_are_checked_and_named_by_class():
    with pytest.raises(SettingsError, match=r"GaussianSettings\.sigma: must be > 0, got 0.0"):
        GaussianSettings(sigma=0)
    with pytest.raises(SettingsError, match=r"ADPSettings\.max_iter: expected an integer"):
        ADPSettings(max_iter="3")


def test_replace_is_checked_like_from_params():
    s = LangevinEBMSettings()
    assert s.replace({"steps": 5}, "attacks[0].surrogate") == dataclasses.replace(s, steps=5)
    with pytest.raises(SettingsError, match=r"attacks\[0\]\.surrogate\.step: unknown setting; did you mean 'steps'"):
        s.replace({"step": 5}, "attacks[0].surrogate")
    with pytest.raises(SettingsError, match=r"attacks\[0\]\.surrogate\.eps: must be ≥ 0"):
        s.replace({"eps": -1.0}, "attacks[0].surrogate")


def test_registry_splits_the_checkpoint_from_the_settings():
    ckpt, s = PURIFIERS.parse("langevin_ebm", {"checkpoint": "m.pt", "steps": 3}, "purifier.params")
    assert ckpt == "m.pt" and s == LangevinEBMSettings(steps=3)
    ckpt, s = PURIFIERS.parse("dip", {"classifier_checkpoint": "c.pt"}, "purifier.params")
    assert ckpt == "c.pt" and s == DIPSettings()
    with pytest.raises(SettingsError, match=r"purifier\.params\.checkpoint: required"):
        PURIFIERS.parse("adp", {"sigma": 0.1}, "purifier.params")
    with pytest.raises(SettingsError, match=r"purifier\.params\.checkpoint: unknown setting"):
        PURIFIERS.parse("gaussian", {"checkpoint": "x.pt"}, "purifier.params")
    assert PURIFIERS.build("gaussian", sigma=0.5).settings == GaussianSettings(sigma=0.5)


# ---------------------------------------------------------------- config: file, dotted key, exit path

@pytest.fixture
def job(tmp_path):
    for name in ("cnn.pt", "ebm.pt"):
        (tmp_path / name).write_bytes(b"")
    return {
        "job": {"name": "t", "output": str(tmp_path / "out")},
        "data": {"shards": str(tmp_path / "s-{0..1}.tar")},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": str(tmp_path / "cnn.pt")}},
        "purifier": {"name": "langevin_ebm", "params": {"checkpoint": str(tmp_path / "ebm.pt"), "steps": 10}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.1}, "surrogate": {"steps": 2}}],
    }


@pytest.mark.parametrize("where, value, message", [
    ("purifier", {"stepz": 3}, "purifier.params.stepz: unknown setting; did you mean 'steps'?"),
    ("purifier", {"steps": "many"}, "purifier.params.steps: expected an integer, got 'many'"),
    ("purifier", {"eps": -0.5}, "purifier.params.eps: must be ≥ 0, got -0.5"),
    ("surrogate", {"stps": 1}, "attacks[0].surrogate.stps: unknown setting; did you mean 'steps'?"),
    ("surrogate", {"steps": -2}, "attacks[0].surrogate.steps: must be ≥ 0, got -2"),
    ("surrogate", {"checkpoint": "other.pt"}, "attacks[0].surrogate.checkpoint: unknown setting"),
])
def test_config_errors_name_file_and_key(job, where, value, message):
    if where == "purifier":
        job["purifier"]["params"].update(value)
    else:
        job["attacks"][0]["surrogate"] = value
    with pytest.raises(ConfigError) as err:
        config.from_dict(job, "job.yaml")
    assert str(err.value).startswith("job.yaml: ") and message in str(err.value)


def test_config_accepts_good_settings_and_a_missing_checkpoint_is_named(job):
    assert config.from_dict(job, "job.yaml").purifier.params["steps"] == 10
    del job["purifier"]["params"]["checkpoint"]
    with pytest.raises(ConfigError, match=r"job.yaml: purifier.params.checkpoint: required"):
        config.from_dict(job, "job.yaml")


# ---------------------------------------------------------------- statistics come back with the images

def test_purified_stats_default_empty_and_chunks_concatenate():
    p = GaussianPurifier(GaussianSettings(sigma=0.1))
    out = p.purify(torch.rand(3, 1, 4, 4), Noise.for_batch(0, ["a", "b", "c"], "t"))
    assert dict(out.stats) == {} and out.nfe == 0

    def counted(x: torch.Tensor, noise: Noise) -> Purified:
        return Purified(x, 1, {"row_mean": x.flatten(1).mean(1)})

    x = torch.rand(5, 1, 2, 2)
    chunked = steps.purify_in_chunks(counted, x, Noise.for_batch(0, list("abcde"), "t"), 2)
    torch.testing.assert_close(chunked.stats["row_mean"], x.flatten(1).mean(1))
