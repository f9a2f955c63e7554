import dataclasses
import textwrap

import pytest

from pipeline import config
from pipeline.config import ConfigError
from tests.conftest import job_dict


def write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def good(tmp_path, digits_models, digits_shards):
    import yaml

    p = tmp_path / "good.yaml"
    p.write_text(yaml.safe_dump(job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"))))
    return p


def test_good_config_loads_and_is_frozen(good):
    cfg = config.load(good)
    assert cfg.attacks[0].name == "pgd" and cfg.data.batch_size == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.job.seed = 3
    again = config.from_dict(cfg.to_dict())
    assert again.hash() == cfg.hash()


def test_hash_ignores_placement_but_not_results(good):
    base = config.load(good)
    assert config.load(good, ["cluster.num_workers=7", "data.batch_size=3"]).hash() == base.hash()
    assert config.load(good, ["attacks.0.params.eps=0.1"]).hash() != base.hash()
    assert config.load(good, ["job.seed=1"]).hash() != base.hash()


@pytest.mark.parametrize("override, message", [
    ("job.sede=1", "unknown key job.sede"),
    ("colour=1", "unknown key colour"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("data.batch_size=0", "data.batch_size: must be ≥ 1"),
    ("evaluation.runs=-2", "evaluation.runs: must be ≥ 1"),
    ("evaluation.device=tpu", "evaluation.device: 'tpu' is not one of"),
    ("evaluation.decision=median",
     "evaluation.decision: 'median' is not one of ['mean_logit', 'vote', 'mean_softmax']"),
    ("attacks.0.gradient=magic", "attacks[0].gradient: 'magic' is not one of"),
    ("attacks.0.name=nosuch", "attacks[0].name: unknown attack 'nosuch'"),
    ("attacks.0.params.epsilon=0.1", "attacks[0].params: "),
    ("purifier.name=nosuch", "purifier.name: unknown purifier 'nosuch'"),
    ("purifier.params.checkpoint=/no/such/file.pt", "purifier.params.checkpoint: file not found: /no/such/file.pt"),
    ("job.stages=[fly]", "job.stages[0]: 'fly' is not one of"),
    ("cluster.max_attempts=0", "cluster.max_attempts: must be ≥ 1"),
])
def test_bad_values_name_the_key_and_file(good, override, message):
    with pytest.raises(ConfigError) as err:
        config.load(good, [override])
    assert message in str(err.value)
    assert str(good) in str(err.value)


def test_missing_required_section(tmp_path):
    p = write(tmp_path, """
        job: {name: x, output: out}
        classifier: {name: small_cnn}
    """)
    with pytest.raises(ConfigError, match="missing required key data"):
        config.load(p)


def test_not_yaml_and_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "job: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.yaml")


def test_attack_eps_in_pixel_units_is_refused(good):
    from pipeline.registry import ATTACKS

    with pytest.raises(ValueError, match="did you mean"):
        ATTACKS.build("pgd", eps=8)
    # the loader refuses it before any work starts, naming the key and the fix
    with pytest.raises(ConfigError) as err:
        config.load(good, ["attacks.0.params.eps=8"])
    assert str(err.value) == (f"{good}: attacks[0].params.eps: 8 is outside [0, 1] (an ℓ∞ eps is in image units, "
                              "pixels in [0, 1]); did you mean 8/255? (write eps: 8/255)")
    with pytest.raises(ConfigError, match=r"attacks\[0\].params.step_size: 2 is outside .* did you mean 2/255"):
        config.load(good, ["attacks.0.params.step_size=2"])
    assert config.load(good, ["attacks.0.params.eps=8", "attacks.0.params.norm=l2"]).attacks[0].params["eps"] == 8
    # every other value the attack's constructor refuses is a ConfigError naming the attack
    with pytest.raises(ConfigError, match=r"attacks\[0\].params: steps must be ≥ 1, got 0"):
        config.load(good, ["attacks.0.params.steps=0"])


def test_fractions_are_read_exactly_in_yaml_and_set(good, tmp_path):
    import yaml

    by_set = config.load(good, ["attacks.0.params.eps=8/255", "attacks.0.params.step_size= 2 / 255"])
    assert by_set.attacks[0].params == {"eps": 8 / 255, "steps": 3, "step_size": 2 / 255}
    decimal = config.load(good, [f"attacks.0.params.eps={8 / 255!r}", f"attacks.0.params.step_size={2 / 255!r}"])
    assert by_set.hash() == decimal.hash()
    doc = yaml.safe_load(good.read_text())
    doc["attacks"] = [{"name": "rfgsm", "params": {"eps": "8/255", "alpha": "0.5/255"}},
                      {"name": "pgd", "params": {"eps": "8/255"}, "surrogate": {"sigma": "1/10"}}]
    doc["purifier"] = {"name": "gaussian", "params": {"sigma": "1/4"}}
    p = tmp_path / "fractions.yaml"
    p.write_text(yaml.safe_dump(doc))
    cfg = config.load(p)
    assert cfg.attacks[0].params == {"eps": 8 / 255, "alpha": 0.5 / 255}
    assert cfg.purifier.params == {"sigma": 0.25} and cfg.attacks[1].surrogate == {"sigma": 0.1}
    assert config.load(good, ["cluster.shard_timeout_s=120/2"]).cluster.shard_timeout_s == 60.0
    for value, message in (("8/0", "'8/0' divides by zero"), ("eight", "expected a number or a fraction such as "
                                                                        "8/255, got 'eight'")):
        with pytest.raises(ConfigError, match=f"attacks\\[0\\].params.eps: {message}"):
            config.load(good, [f"attacks.0.params.eps={value}"])


def test_override_syntax_errors(good):
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load(good, ["job.seed"])
    with pytest.raises(ConfigError, match="not an index"):
        config.load(good, ["attacks.5.params.eps=0.1"])


def test_every_shipped_config_is_valid():
    """configs/*.yaml parse and validate (attacks, presets, sections); their checkpoints and
    shards are made by the commands in each header, so files are not looked for here."""
    from pathlib import Path

    shipped = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        cfg = config.load(path, check_components=False)
        assert cfg.attacks or cfg.purifier, path


@pytest.mark.parametrize("attacks, evaluation, expected", [
    ([{"preset": "autoattack_rand"}], {}, True),                     # AutoAttack runs its attacks as a cascade
    ([{"preset": "autoattack_standard"}, {"preset": "diffpure2022"}], {"cascade": "auto"}, True),
    ([{"preset": "autoattack_rand"}, {"name": "pgd", "params": {"eps": 0.1}}], {}, False),   # a plain entry
    ([{"preset": "hill2021"}], {}, False),
    ([{"preset": "autoattack_rand"}], {"cascade": False}, False),   # an explicit value wins
    ([{"name": "pgd", "params": {"eps": 0.1}}], {"cascade": True}, True),
    ([], {}, False),
])
def test_cascade_auto_follows_the_presets_reference(attacks, evaluation, expected):
    data = {"job": {"name": "j", "output": "o"}, "data": {"shards": "s.tar"}, "classifier": {"name": "small_cnn"},
            "attacks": attacks, "evaluation": evaluation}
    cfg = config.from_dict(data, "job.yaml", check_components=False)
    assert cfg.evaluation.cascade is expected
    assert config.from_dict(cfg.to_dict(), check_components=False).evaluation.cascade is expected   # as dumped
