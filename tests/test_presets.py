"""Attack presets: published settings, overrides, ε sweeps, and config compatibility."""
from __future__ import annotations

import json

import pytest

from pipeline import config
from pipeline.attacks.presets import PRESETS, expand_preset, get_preset, preset_names
from pipeline.registry import ATTACKS


def test_every_preset_builds():
    assert {"hill2021", "adp2021", "lee_kim2023", "autoattack_rand", "autoattack_standard",
            "advpure_apgd_eot", "sanity_sweep", "diffpure2022", "chen2024"} <= set(preset_names())
    assert "apgd_eot" not in preset_names()  # renamed: our combination must say it is ours
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


def test_autoattack_presets_match_autoattack_versions():
    """AutoAttack's set_version (fra31/auto-attack, autoattack.py): 'rand' = apgd-ce + apgd-dlr,
    n_restarts 1, eot_iter 20, n_iter 100; 'standard' = apgd-ce (1 restart), apgd-t (9 target
    classes, 1 restart), fab-t, square (5,000 queries, p_init 0.8, no schedule rescaling)."""
    common = {"eps": 8 / 255, "norm": "linf", "steps": 100, "restarts": 1, "rho": 0.75,
              "schedule": "autoattack", "eot_reduction": "mean_loss"}
    ce, dlr = expand_preset("autoattack_rand")
    assert ce["params"] == {**common, "loss": "ce"} and dlr["params"] == {**common, "loss": "dlr"}
    assert ce["eot"] == dlr["eot"] == 20 and ce["gradient"] == dlr["gradient"] == "auto"
    apgd_ce, apgd_t, square = expand_preset("autoattack_standard")
    assert apgd_ce["params"] == {**common, "loss": "ce"}
    assert apgd_t["params"] == {**common, "loss": "dlr", "targeted": True, "target_mode": "top",
                                "n_target_classes": 9, "targeted_success": "misclassified"}
    assert square["name"] == "square" and square["params"] == {
        "eps": 8 / 255, "norm": "linf", "n_queries": 5000, "p_init": 0.8, "rescale_schedule": False}
    assert all(e["eot"] == 1 for e in (apgd_ce, apgd_t, square))
    # the built APGD runs AutoAttack's checkpoints (N = 100)
    a = ATTACKS.build("apgd", **apgd_t["params"])
    assert a.checkpoints == [22, 41, 57, 70, 80, 87, 93, 99] and a.restarts == 1
    assert "FAB-T" in get_preset("autoattack_standard").description  # the left-out attack is named
    for name in ("autoattack_rand", "autoattack_standard"):
        assert "auto-attack" in get_preset(name).reference and get_preset(name).ours
    assert get_preset("advpure_apgd_eot").reference.startswith("ours")
    assert get_preset("advpure_apgd_eot").description.startswith("Our combination")


def test_diffpure2022_is_both_autoattack_versions():
    entries = expand_preset("diffpure2022")
    assert entries == expand_preset("autoattack_rand") + expand_preset("autoattack_standard")
    assert [e["eot"] for e in entries] == [20, 20, 1, 1, 1]
    assert "adjoint" in get_preset("diffpure2022").paper and "FAB-T" in get_preset("diffpure2022").ours


def test_chen2024_is_exact_gradient_pgd_and_apgd_with_eot():
    """Chen et al. (ICML 2024) on DiffPure: PGD-200 without random start, EOT 32, and APGD-DLR
    with EOT 20 (their DiffPure attack script), both through the exact, checkpointed solver."""
    from pipeline.purifiers.diffpure import DiffPureSettings

    pgd, apgd = expand_preset("chen2024")
    assert pgd["name"] == "pgd" and pgd["eot"] == 32 and pgd["params"] == {
        "eps": 8 / 255, "steps": 200, "step_size": 2 / 255, "norm": "linf", "random_start": False,
        "eot_reduction": "mean_loss"}
    assert apgd["name"] == "apgd" and apgd["eot"] == 20 and apgd["params"]["loss"] == "dlr"
    assert apgd["params"]["steps"] == 100 and apgd["params"]["eps"] == 8 / 255
    for e in (pgd, apgd):   # the gradient the purifier needs: through it, by its exact unrolled solver
        assert e["gradient"] == "full" and e["surrogate"] == {"gradient_method": "exact"}
        assert DiffPureSettings().replace(e["surrogate"], "attacks[0].surrogate") == DiffPureSettings()
    p = get_preset("chen2024")
    assert "2305.15241" in p.reference and "DiffusionClassifier" in p.reference
    assert "not in the authors' released code" in p.description and "2/255" in p.ours
    # their ImageNet script's settings as overrides; the surrogate can be dropped for another purifier
    pgd_in, apgd_in = expand_preset("chen2024", {"eps": 4 / 255, "steps": 80, "step_size": 1 / 255,
                                                 "eot": 20, "surrogate": {}})
    assert pgd_in["params"]["step_size"] == 1 / 255 and "step_size" not in apgd_in["params"]
    assert pgd_in["params"]["steps"] == apgd_in["params"]["steps"] == 80
    assert "surrogate" not in pgd_in and pgd_in["eot"] == apgd_in["eot"] == 20
    with pytest.raises(ValueError, match=r"preset 'chen2024': unexpected parameters \['eot_iter'\]"):
        expand_preset("chen2024", {"eot_iter": 20})
    with pytest.raises(ValueError, match="cannot be overridden"):
        expand_preset("chen2024", {"name": "fgsm"})


def test_overrides_and_sweeps():
    (e,) = expand_preset("hill2021", {"eps": 0.3, "eot": 5, "gradient": "full", "steps": 7})
    assert e["params"]["eps"] == 0.3 and e["params"]["steps"] == 7 and e["eot"] == 5 and e["gradient"] == "full"
    sweep = expand_preset("adp2021", {"eps": [2 / 255, 4 / 255, 8 / 255]})
    assert [s["params"]["eps"] for s in sweep] == [2 / 255, 4 / 255, 8 / 255]
    (lk,) = expand_preset("lee_kim2023", {"surrogate": {"steps": 5}})
    assert lk["surrogate"] == {"steps": 5}
    assert len(expand_preset("advpure_apgd_eot", {"eps": [0.1, 0.2]})) == 4
    # a parameter reaches only the entries whose attack takes it, and must reach one
    aa = expand_preset("autoattack_standard", {"steps": 10, "eps": 0.1, "eot": 3})
    assert [e["params"].get("steps") for e in aa] == [10, 10, None]
    assert all(e["params"]["eps"] == 0.1 and e["eot"] == 3 for e in aa)
    assert expand_preset("autoattack_standard", {"n_queries": 100})[2]["params"]["n_queries"] == 100
    with pytest.raises(ValueError, match="unexpected.*n_queries"):
        expand_preset("autoattack_rand", {"n_queries": 100})
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
