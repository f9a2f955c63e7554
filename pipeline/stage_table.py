"""Every stage a job can run, in one table: what it reads, the function it runs, the image
shards it writes (folder, file names, lineage), its noise contexts and the planner's
calibration of it. Config (the names `job.stages` accepts), worker (what a shard runs, where
its images go), driver (a stage's input, which outputs it indexes), plan (calibration),
commit and report (the stages with records) read it; nothing else dispatches on a stage
name (the report's example images still pick the attack and purify stages' images by name:
what a clean / adversarial / purified triple means is the report's knowledge).

Torch-free, like the report: the functions are named lazily, as "module:function" strings,
loaded where they run (the worker, `advpure plan`). A new stage is one `register(Stage(...))`
(tests/test_stage_recipe.py registers a stage that flips images and runs it through the
driver). Stages registered outside this module travel to the worker actors with the job
(`added`, `adopt`): their processes import only this module's built-in stages.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Origin:
    """What a lineage function may record of an image besides its input sample: the input
    shard (url, id) and the provenance of the job that made the image."""
    url: str
    sid: str
    provenance: Mapping[str, Any]


@dataclass(frozen=True)
class ImageOutput:
    """The image shards a stage writes under the job's output, one per (input shard, output
    name): `folder/file`, `file` formatted with {sid} (the input shard's id) and {output}
    (the stage function's output name). `lineage` names the function
    (sample, extra, Origin) → the json member each image carries."""
    folder: str
    file: str
    lineage: str

    def file_name(self, sid: str, output: str) -> str:
        return self.file.format(sid=sid, output=output)


@dataclass(frozen=True)
class Stage:
    """One stage. `run`: "module:function", (protocol, samples[, emit]) → StageOutput, emit
    given when the stage writes images; None for a stage whose records another job's worker
    writes (the corpus job's), which no evaluation job may name. `reads`: the stage whose
    image shards this one takes as input when the same job ran it earlier; otherwise (or
    None) the job's data.shards. `noise`: every seeding context its draws are keyed by
    (pipeline/seeding.py), as templates over NOISE_FIELDS; tests/test_stage_table.py runs each
    stage with the seeding instrumented and holds this list to exactly what it uses.
    `calibrate`: "module:function", (protocol, batch, inputs) → (measured pieces, images by
    output), inputs = the images the `reads` stage's calibration
    returned (None when it did not run); None: `advpure plan` predicts no time for it.
    Registered in the order a job runs them (a stage after the one it reads)."""
    name: str
    run: str | None
    reads: str | None = None
    images: ImageOutput | None = None
    noise: tuple[str, ...] = ()
    calibrate: str | None = None
    report_rank: int = 100   # a report shows the stage of lowest rank among those with records

    def function(self) -> Callable[..., Any]:
        if self.run is None:
            raise ValueError(f"stage {self.name!r} is run by its own job, not by an evaluation worker")
        return load(self.run)

    def lineage(self) -> Callable[..., dict[str, Any]]:
        assert self.images is not None, self.name
        return load(self.images.lineage)


# the fields a `noise` template may name: an attack's index in the job and its registered
# name, a target step, a number of EOT draws
NOISE_FIELDS = {"i": r"\d+", "name": r"[a-z0-9_]+", "t": r"\d+", "n": r"\d+"}


def noise_pattern(template: str) -> re.Pattern[str]:
    """The contexts a `noise` template stands for, e.g. "attack{i}/{name}/own" → attack0/pgd/own."""
    parts = re.split(r"\{(\w+)\}", template)
    unknown = set(parts[1::2]) - set(NOISE_FIELDS)
    if unknown:
        raise ValueError(f"noise context {template!r} names {sorted(unknown)}; the fields are {list(NOISE_FIELDS)}")
    return re.compile("".join(re.escape(p) if i % 2 == 0 else NOISE_FIELDS[p] for i, p in enumerate(parts)) + "$")


def load(ref: str) -> Callable[..., Any]:
    """The function a "module:function" string names (imported now)."""
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"stage function {ref!r} cannot be loaded: {err}") from err


# ---------------------------------------------------------------------------- lineage

def origin_lineage(sample: Any, extra: Mapping[str, Any], origin: Origin) -> dict[str, Any]:
    """An image made from a source sample: where it came from, the job that made it, and
    the stage's per-image fields (an attack's lineage columns)."""
    prov = origin.provenance
    return {"source_shard": origin.url, "source_key": sample.key, "shard": origin.sid,
            "config_hash": prov["config_hash"], "seed": prov["seed"], **extra}


def purified_lineage(sample: Any, extra: Mapping[str, Any], origin: Origin) -> dict[str, Any]:
    """A purified image: its input's lineage carried on, plus the purifier and this job's hash."""
    prov = origin.provenance
    return {**sample.meta, "purifier": prov["purifier"], "purifier_params": prov["purifier_params"],
            "purify_config_hash": prov["config_hash"], **extra}


# ---------------------------------------------------------------------------- the table

_SHARD = "pipeline.evaluation.stages"
_PLAN = "pipeline.run.plan"
# the R evaluation runs of clean and attacked images: shared by evaluate and purify, so that
# [attack, purify] reproduces [evaluate]
_EVAL = ("eval/clean", "eval/attack{i}")
# evaluation.verdict recheck: the clean verdict from the first attack's EOT draws and their re-check
_RECHECK_VERDICT = ("eval/clean/nominate", "eval/clean/recheck")
# an attack's EOT draws at target step t, its own randomness, the draws confirming a break
_ATTACK = ("attack{i}/{name}/step{t}", "attack{i}/{name}/own", "attack{i}/{name}/recheck/step{t}")
# a shard's first batch: gradient-masking checks; the EOT probe reruns an attack with n draws
_CHECKS = ("checks{i}/step{t}", "probe{i}/eot{n}/step{t}", "probe{i}/eot{n}/own",
           "probe{i}/eot{n}/recheck/step{t}", "probe{i}/eval{n}")
BUILT_IN = (
    Stage("evaluate", f"{_SHARD}:evaluate", noise=_EVAL + _RECHECK_VERDICT + _ATTACK + _CHECKS,
          calibrate=f"{_PLAN}:calibrate_evaluate", report_rank=0),
    Stage("attack", f"{_SHARD}:attack",
          images=ImageOutput("adversarial", "{sid}-a{output}.tar", f"{__name__}:origin_lineage"),
          noise=_ATTACK, calibrate=f"{_PLAN}:calibrate_attack", report_rank=2),
    Stage("purify", f"{_SHARD}:purify", reads="attack",
          images=ImageOutput("purified", "{sid}.tar", f"{__name__}:purified_lineage"),
          noise=_EVAL, calibrate=f"{_PLAN}:calibrate_purify", report_rank=1),
    Stage("purify_corpus", None, noise=("purify_corpus",), report_rank=3),   # pipeline/corpus: its own worker
)
_TABLE: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage (the same record again is a no-op; another under a taken name an error)."""
    known = _TABLE.get(stage.name)
    if known is not None and known != stage:
        raise ValueError(f"stage {stage.name!r} is already registered as {known}")
    if stage.reads is not None and (stage.reads not in _TABLE or _TABLE[stage.reads].images is None):
        raise ValueError(f"stage {stage.name!r} reads {stage.reads!r}, which is no registered stage writing images")
    for ref in (stage.run, stage.calibrate, stage.images and stage.images.lineage):
        if ref is not None and ":" not in ref:
            raise ValueError(f"stage {stage.name!r}: {ref!r} is not a 'module:function' name")
    for template in stage.noise:
        try:
            noise_pattern(template)
        except ValueError as err:
            raise ValueError(f"stage {stage.name!r}: {err}") from None
    _TABLE[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a registered stage (a test's toy stage); the built-in ones stay."""
    if name in {s.name for s in BUILT_IN}:
        raise ValueError(f"stage {name!r} is built in")
    _TABLE.pop(name, None)


def get(name: str) -> Stage:
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; the stages are {list(_TABLE)}") from None


def job_stages() -> tuple[str, ...]:
    """The stages an evaluation job's `job.stages` may name."""
    return tuple(s.name for s in _TABLE.values() if s.run is not None)


def result_stages() -> tuple[str, ...]:
    """Every stage that writes records under an output, the report's preferred one first."""
    return tuple(s.name for s in sorted(_TABLE.values(), key=lambda s: s.report_rank))


def added(names: Iterable[str]) -> list[Stage]:
    """The named stages that are not built in (a worker process must adopt them)."""
    built_in = set(BUILT_IN)
    return [s for s in map(get, names) if s not in built_in]


def adopt(stages: Sequence[Stage]) -> None:
    """Register the stages a driver sent along (in a worker process)."""
    for s in stages:
        register(s)


for _stage in BUILT_IN:
    register(_stage)
