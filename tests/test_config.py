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
