"""Attack presets: published settings, overrides, ε sweeps, and config compatibility."""
from __future__ import annotations

import json

import pytest

from pipeline import config
from pipeline.attacks.presets import PRESETS, expand_preset, get_preset, preset_names
from pipeline.registry import ATTACKS


def test_every_preset_builds():
    assert {"hill2021", "adp2021", "lee_kim2023", "apgd_eot", "sanity_sweep"} <= set(preset_names())
    for name in preset_names():
        entries = expand_preset(name)
        assert entries
        for e in entries:
            assert set(e) <= {"name", "params", "gradient", "eot", "surrogate"}
            attack = ATTACKS.build(e["name"], **e["params"])
            json.dumps(attack.params())
            json.dumps(e)
        p = get_preset(name)
        assert p.reference and p.paper and p.description


def test_published_settings():
    (hill,) = expand_preset("hill2021")
    assert hill["name"] == "pgd" and hill["gradient"] == "bpda" and hill["eot"] == 15
    assert hill["params"] == {"eps": 8 / 255, "steps": 50, "step_size": 2 / 255, "norm": "linf",
                              "random_start": True, "eot_reduction": "mean_logits",
                              "keep_broken": True, "recheck_draws": 150}
    (adp,) = expand_preset("adp2021")
    assert adp["eot"] == 15 and adp["params"]["steps"] == 40 and adp["params"]["random_start"] is False
    assert adp["params"]["eot_reduction"] == "sign_sum" and adp["params"]["step_size"] == 2 / 255
    (lk,) = expand_preset("lee_kim2023")
    assert lk["gradient"] == "full" and lk["eot"] == 20 and "surrogate" not in lk
    assert lk["params"]["steps"] == 200 and lk["params"]["step_size"] == 0.007
    assert ATTACKS.build("pgd", **hill["params"]).recheck_draws == 150


def test_overrides_and_sweeps():
    (e,) = expand_preset("hill2021", {"eps": 0.3, "eot": 5, "gradient": "full", "steps": 7})
    assert e["params"]["eps"] == 0.3 and e["params"]["steps"] == 7 and e["eot"] == 5 and e["gradient"] == "full"
    sweep = expand_preset("adp2021", {"eps": [2 / 255, 4 / 255, 8 / 255]})
    assert [s["params"]["eps"] for s in sweep] == [2 / 255, 4 / 255, 8 / 255]
    (lk,) = expand_preset("lee_kim2023", {"surrogate": {"steps": 5}})
    assert lk["surrogate"] == {"steps": 5}
    assert len(expand_preset("apgd_eot", {"eps": [0.1, 0.2]})) == 4
    with pytest.raises(ValueError, match="bad|unexpected|parameters"):
        expand_preset("hill2021", {"no_such_param": 1})
    with pytest.raises(ValueError):
        expand_preset("hill2021", {"name": "fgsm"})
    with pytest.raises(KeyError):
        expand_preset("nope")
    # expansion returns fresh dicts: mutating one does not touch the preset
    expand_preset("hill2021")[0]["params"]["eps"] = 99
    assert PRESETS["hill2021"].entries[0]["params"]["eps"] == 8 / 255


def test_entries_parse_as_attack_configs():
    entries = [e for n in preset_names() for e in expand_preset(n)]
    data = {"job": {"name": "t", "output": "/tmp/x"}, "data": {"shards": ["s"]},
            "classifier": {"name": "small_cnn", "params": {}}, "attacks": entries}
    cfg = config.from_dict(data, check_components=False)
    assert len(cfg.attacks) == len(entries)
    assert cfg.attacks[0].params == entries[0]["params"]
