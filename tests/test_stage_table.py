"""The stage table's `noise` field is what the stages use: each stage runs on a tiny batch with
the seeding instrumented, and the contexts its draws were keyed by are exactly the templates
its entry declares (no undeclared context, no declared one unused); ARCHITECTURE.md's
noise-context table lists the same contexts for the same stages."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config, stage_table
from pipeline.seeding import Noise

ROOT = Path(__file__).resolve().parents[1]


def template_of(stage: str, context: str) -> str:
    """The template of `stage`'s table entry that `context` is an instance of."""
    found = [t for t in stage_table.get(stage).noise if stage_table.noise_pattern(t).match(context)]
    assert len(found) == 1, f"stage {stage!r} drew from context {context!r}, which matches {found} of its " \
                            f"declared noise {stage_table.get(stage).noise} (pipeline/stage_table.py)"
    return found[0]


@pytest.fixture
def contexts(monkeypatch) -> list[str]:
    """Every context Noise.for_batch is keyed by while the test runs (and no unkeyed noise)."""
    used: list[str] = []
    keyed = Noise.for_batch.__func__

    def for_batch(cls, seed, keys, context, replicas=1, device="cpu"):
        used.append(context)
        return keyed(cls, seed, keys, context, replicas, device)

    def unkeyed(cls, rows, device="cpu"):
        raise AssertionError("a stage drew unkeyed noise")

    monkeypatch.setattr(Noise, "for_batch", classmethod(for_batch))
    monkeypatch.setattr(Noise, "unkeyed", classmethod(unkeyed))
    return used


@pytest.fixture(scope="module")
def protocol_cfg(tmp_path_factory) -> dict:
    """A job over 8×8 grey images that reaches every draw: a stochastic purifier (Gaussian),
    PGD through it with EOT and confirmed breaks, a second attack, the EOT probe (every
    sample attacked; the clean gate draws nothing of its own: it reads the clean evaluation)."""
    from pipeline.classifiers import small_cnn
    from pipeline.io import checkpoints

    d = tmp_path_factory.mktemp("noise")
    cnn = str(d / "cnn.pt")
    torch.manual_seed(0)
    checkpoints.save(cnn, small_cnn.ARCH, {"in_channels": 1, "width": 4}, small_cnn.make(1, width=4).state_dict(), {})
    pgd = {"name": "pgd", "params": {"eps": 0.3, "steps": 2, "step_size": 0.2}, "gradient": "full", "eot": 2}
    return {
        "job": {"name": "noise", "output": str(d / "out")}, "data": {"shards": "unused.tar", "batch_size": 4},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
        "purifier": {"name": "gaussian", "params": {"sigma": 0.3}},
        "attacks": [pgd, {"name": "fgsm", "params": {"eps": 0.3}, "gradient": "bpda"}],
        # an untrained classifier on random images: the clean gate would keep every sample from the attack
        "evaluation": {"runs": 2, "eot_probe": 2, "attack_misclassified": True},
    }


def _protocol(cfg: dict, **evaluation):
    from pipeline.evaluation.protocol import build_protocol

    return build_protocol(config.from_dict({**cfg, "evaluation": {**cfg["evaluation"], **evaluation}}))


def _samples(n: int = 4):
    from pipeline.io.shards import Sample

    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return [Sample(f"s{i}", images[i], i % 10) for i in range(n)]


def _check(stage: str, used: list[str]) -> None:
    from pipeline.evaluation import row_chunks

    # the worker's one-time calibration (row chunk, memory format) draws from its own context, never a stage's
    used = [c for c in used if not c.startswith(row_chunks.CONTEXT + "/")]
    assert used, f"stage {stage!r} drew no noise"
    seen = {template_of(stage, c) for c in used}
    declared = set(stage_table.get(stage).noise)
    assert seen == declared, f"stage {stage!r} declares {sorted(declared - seen)} but never draws from them"


def test_evaluate_draws_from_exactly_its_declared_contexts(protocol_cfg, contexts):
    from pipeline.evaluation import stages

    out = stages.evaluate(_protocol(protocol_cfg), _samples())
    assert len(out.rows) == 4 * 2 and {c["name"] for c in out.checks["0"]} >= {"eot_probe"}
    cascaded = len(contexts)
    stages.evaluate(_protocol(protocol_cfg, cascade=True, eot_probe=0), _samples())
    assert len(contexts) > cascaded
    # the recheck verdict's clean evaluation (FGSM never checks its image: only PGD can run so)
    stages.evaluate(_protocol({**protocol_cfg, "attacks": protocol_cfg["attacks"][:1]}, verdict="recheck",
                              eot_probe=0), _samples())
    _check("evaluate", contexts)


def test_attack_then_purify_draw_from_exactly_their_declared_contexts(protocol_cfg, contexts):
    from pipeline.evaluation import stages
    from pipeline.io.shards import Sample

    p = _protocol(protocol_cfg)
    out = stages.attack(p, _samples())
    _check("attack", contexts)
    contexts.clear()
    adversarial = [Sample(s.key, image, s.label, meta=lineage) for s, image, lineage in out.images["0"]]
    stages.purify(p, _samples()[:2] + adversarial[2:])     # clean images (no lineage) and attacked ones
    _check("purify", contexts)


def test_purify_corpus_draws_from_exactly_its_declared_context(tmp_path, contexts):
    from pipeline.corpus import job
    from pipeline.corpus.engine import Engine

    cfg = job.build_config("unused.tar", str(tmp_path / "out"), purifier="gaussian", params={"sigma": 0.1},
                           classifier=None, classifier_params=None, corpus={}, overrides=[])
    outcomes = Engine(cfg).run([torch.rand(3, 8, 8), torch.rand(3, 8, 8)], ["a", "b"])
    assert all(o.error is None for o in outcomes)
    _check("purify_corpus", contexts)


def test_a_context_outside_the_table_is_named():
    with pytest.raises(AssertionError, match="attack0/pgd/restart1"):
        template_of("attack", "attack0/pgd/restart1")
    assert template_of("attack", "attack12/apgd_t/recheck/step3") == "attack{i}/{name}/recheck/step{t}"
    assert not stage_table.noise_pattern("eval/attack{i}").match("eval/attack0/step1")


def test_a_noise_template_with_an_unknown_field_is_refused():
    with pytest.raises(ValueError, match=r"stage 'toy': noise context 'toy/\{k\}' names \['k'\]"):
        stage_table.register(stage_table.Stage("toy", "tests.test_stage_table:nothing", noise=("toy/{k}",)))
    assert "toy" not in stage_table.result_stages()


def _architecture_noise_table() -> dict[str, set[str]]:
    """{context: stages} from the table under "## Noise contexts" in ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Noise contexts", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = defaultdict(set)
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for context in re.findall(r"`([^`]+)`", cells[0]):
            table[context] |= set(re.findall(r"`([^`]+)`", cells[1]))
    return dict(table)


def test_architecture_lists_every_stage_s_noise_contexts():
    declared: dict[str, set[str]] = defaultdict(set)
    for name in stage_table.result_stages():
        for template in stage_table.get(name).noise:
            declared[template].add(name)
    assert _architecture_noise_table() == dict(declared)
