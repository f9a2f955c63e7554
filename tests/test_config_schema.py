"""The job file's JSON Schema (`advpure config-schema`): every shipped config and the README's
job validate against it, it rejects what the loader rejects (unknown keys, wrong enum values,
values past a bound), and the command prints it as JSON."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator

from pipeline import cli, config
from pipeline.config_schema import BOUNDS, job_schema

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"JobConfig": "job", "DataConfig": "data", "AttackConfig": "attacks.0", "EvaluationConfig": "evaluation",
            "ClusterConfig": "cluster", "FaultConfig": "faults.0", "CorpusConfig": "corpus"}
MINIMAL = {"job": {"name": "j", "output": "runs/j"}, "data": {"shards": "s-{0..1}.tar"},
           "classifier": {"name": "small_cnn"}, "attacks": [{"name": "pgd", "params": {"eps": "8/255"}}],
           "faults": [{"shard": "s-0", "mode": "raise", "marker_dir": "m"}], "corpus": {}}


@pytest.fixture(scope="module", params=[("2020-12", Draft202012Validator), ("7", Draft7Validator)], ids=lambda p: p[0])
def validator(request):
    draft, cls = request.param
    schema = job_schema(draft)
    cls.check_schema(schema)
    assert schema["$schema"] == cls.META_SCHEMA["$schema"]
    return cls(schema)


def _readme_job() -> dict:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### A job\s+```yaml\n(.*?)```", text, re.S)
    assert block, "README's 'A job' section lost its yaml block"
    return yaml.safe_load(block[1])


SHIPPED = sorted(ROOT.glob("configs/*.yaml"))


def test_configs_are_found():
    assert len(SHIPPED) >= 10


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(validator, path):
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


def test_readme_job_and_test_job_validate(validator, tmp_path):
    from tests.conftest import job_dict

    validator.validate(_readme_job())
    validator.validate(job_dict("s-{0..1}.tar", {"cnn": "c.pt", "dae": "d.pt"}, str(tmp_path)))
    validator.validate(MINIMAL)


def test_demo_job_validates(validator):
    from pipeline.train.demo import demo_config

    validator.validate(demo_config("runs/demo", "runs/demo/shards/shard-{000000..000003}.tar", 2))


def _with(key: str, value) -> dict:
    data = copy.deepcopy(MINIMAL)
    node = data
    *path, last = key.split(".")
    for part in path:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize("key, value", [
    ("job.nmae", "x"),                                   # an unknown key in a section
    ("evalution", {}),                                    # an unknown section
    ("evaluation.decision", "majority"),                  # not a decision rule
    ("attacks.0.gradient", "straight_through"),           # not a gradient mode
    ("job.stages", ["evaluate", "classify"]),             # not a stage
    ("job.stages", []),
    ("evaluation.runs", True),                            # a bool is not an integer
    ("cluster.cpus_per_worker", "fast"),                  # a string that is no fraction
    ("attacks.0", {"preset": "hill2021", "name": "pgd"}),  # a preset entry takes preset and overrides only
    ("attacks.0", {"preset": "hill2022"}),                # no such preset
])
def test_schema_rejects(validator, key, value):
    assert not validator.is_valid(_with(key, value))


@pytest.mark.parametrize("key, value", [
    ("cluster.cpus_per_worker", "1/2"), ("cluster.gpus_per_worker", "1 / 4"), ("job.stages", "attack"),
    ("data.shards", ["a.tar", "b.tar"]), ("attacks.0", {"preset": "hill2021", "overrides": {"eps": [0.1, "8/255"]}}),
])
def test_schema_accepts_what_the_loader_reads(validator, key, value):
    assert validator.is_valid(_with(key, value))
    if not key.startswith("attacks"):   # a preset's expansion checks its attacks' parameters (the registry)
        config.from_dict(_with(key, value), check_components=False)


def _past(bound: dict):
    if "enum" in bound:
        return 2
    if "maximum" in bound and "minimum" not in bound:
        return bound["maximum"] + 1
    return bound.get("minimum", bound.get("exclusiveMinimum", 0)) - (1 if "minimum" in bound else 0)


@pytest.mark.parametrize("field", sorted(BOUNDS))
def test_bounds_are_the_loaders(validator, field):
    """Each bound shown to editors is one the loader enforces: the value just past it is an
    error naming the key in both; the schema's bound value itself passes both."""
    cls, name = field.split(".")
    key = f"{SECTIONS[cls]}.{name}"
    bound = BOUNDS[field]
    values = [_past(bound)] + ([bound["maximum"] + 1] if "maximum" in bound and "minimum" in bound else [])
    for value in values:
        assert not validator.is_valid(_with(key, value)), (key, value)
        with pytest.raises(config.ConfigError, match=re.escape(re.sub(r"\.(\d+)", r"[\1]", key))):
            config.from_dict(_with(key, value), check_components=False)
    at = bound["enum"][0] if "enum" in bound else bound.get("minimum", bound.get("maximum"))
    if at is not None:
        data = _with(key, at)
        assert validator.is_valid(data), (key, at)
        config.from_dict(data, check_components=False)


def test_descriptions_come_from_config_comments():
    defs = job_schema()["$defs"]
    undocumented = [f"{name}.{key}" for name, d in defs.items() for key, p in d["properties"].items()
                    if not p.get("description")]
    assert not undocumented, f"fields with no comment in pipeline/config.py: {undocumented}"
    assert "brace patterns" in defs["DataConfig"]["properties"]["shards"]["description"]
    assert "Lee & Kim 2023" in defs["AttackConfig"]["properties"]["surrogate"]["description"]
    assert defs["CorpusConfig"]["properties"]["jpeg_quality"]["description"].startswith("JPEG")


def test_cli_prints_the_schema(capsys, tmp_path):
    assert cli.main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema == json.loads(json.dumps(job_schema()))
    assert cli.main(["config-schema", "--draft", "7", "-o", str(tmp_path / "job.schema.json")]) == 0
    draft7 = json.loads((tmp_path / "job.schema.json").read_text())
    assert "definitions" in draft7 and "$defs" not in draft7 and "$defs" not in json.dumps(draft7)


def test_the_command_imports_no_torch(tmp_path):
    """An editor's helper should be instant: config-schema reads config.py, not the models."""
    code = ("import sys; from pipeline import cli; "
            f"assert cli.main(['config-schema', '-o', {str(tmp_path / 's.json')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
