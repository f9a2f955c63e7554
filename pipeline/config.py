"""Job configuration: YAML → frozen pydantic dataclasses, checked strictly before any work starts.

Each section is a pydantic v2 dataclass: strict types (no "3" for 3, no 1 for true), unknown
keys refused, and every bound on a single value written once, on its field; `advpure
config-schema` prints the JSON Schema of these same classes, so the editor's rules and the
loader's cannot drift. Checks across fields, of components and of files follow the parse.
Every error names the file and the dotted key: an unknown key, a wrong type, a value out
of range, an unknown classifier/purifier/attack, parameters its constructor does not
take, or a checkpoint/shard file that does not exist.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import re
import types
import typing
from dataclasses import field
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails, PydanticKnownError

from pipeline import stage_table
from pipeline.vocabulary import DECISIONS, DEFAULT_DECISION, GRADIENT_REQUESTS, VERDICTS


class ConfigError(ValueError):
    """A configuration problem, with the file and key it concerns."""


# ---------------------------------------------------------------------------- value types

_FRACTION = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*")


def parse_fraction(value: str, where: str = "") -> float | None:
    """`8/255` (or `0.5/255`) → the nearest float to the exact quotient; None when `value` is
    not a fraction. YAML reads `8/255` as a string; ε is conventionally written so."""
    m = _FRACTION.fullmatch(value)
    if m is None:
        return None
    den = Fraction(m[2])
    if den == 0:
        raise ConfigError(f"{where}: {value!r} divides by zero" if where else f"{value!r} divides by zero")
    return float(Fraction(m[1]) / den)


def _fraction(value: Any) -> Any:
    parsed = parse_fraction(value) if isinstance(value, str) else None
    return value if parsed is None else parsed


def _one_or_many(value: Any) -> Any:
    """`shards: a.tar` reads as a one-item list; a list becomes the field's tuple."""
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def _known_stage(name: str) -> str:
    """A stage of the stage table as it is now (a test may register one after import)."""
    stages = stage_table.job_stages()
    if name not in stages:
        raise ValueError(f"{name!r} is not one of {list(stages)}")
    return name


def _not_bool(value: Any) -> Any:
    """JSON's true would pass as the literal 1."""
    if isinstance(value, bool):
        raise PydanticKnownError("int_type")
    return value


# a bound goes before the fraction reader, so that the schema shows it on the number
Number = Annotated[float, BeforeValidator(_fraction)]   # also a fraction such as 8/255
PositiveNumber = Annotated[float, Field(gt=0), BeforeValidator(_fraction)]
NonNegativeNumber = Annotated[float, Field(ge=0), BeforeValidator(_fraction)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
NonBlank = Annotated[str, Field(pattern=r"\S")]
OneOrMore = Field(min_length=1)   # a list that names at least one item

# strict types, unknown keys refused; frozen is the dataclass's own (FrozenInstanceError)
STRICT = ConfigDict(strict=True, extra="forbid")


# ---------------------------------------------------------------------------- sections

@dataclass(frozen=True, config=STRICT)
class JobConfig:
    """What the job is called, where its results go, and which stages it runs."""
    name: NonBlank                  # the job's name (records, manifest, report)
    output: NonBlank                # results folder, local or s3:// (resumed if it holds this job)
    # run seed: every random draw is keyed by (seed, sample key, purpose, index)
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    # run in order, each resumed on its own (README, Stages)
    stages: Annotated[tuple[Annotated[str, AfterValidator(_known_stage)], ...], OneOrMore,
                      BeforeValidator(_one_or_many)] = ("evaluate",)


@dataclass(frozen=True, config=STRICT)
class DataConfig:
    """The input: WebDataset shards (advpure make-shards)."""
    # shard paths or brace patterns (shard-{000000..000009}.tar), local, s3:// or https://
    shards: Annotated[tuple[str, ...], OneOrMore, BeforeValidator(_one_or_many)]
    index: str | None = None        # the shards' index.json (null: next to the shards)
    batch_size: Positive = 128      # samples per batch (memory and speed; noise is keyed per sample)
    max_samples_per_shard: Positive | None = None   # a quick job on the first samples of each shard (null: all)


@dataclass(frozen=True, config=STRICT)
class ModelConfig:
    """A registered classifier or purifier (`advpure list`) and its parameters."""
    name: str                       # a registered name (`advpure list`); purifier none: no purification
    params: dict[str, Any] = field(default_factory=dict)   # constructor parameters (docs/ for each method)


@dataclass(frozen=True, config=STRICT)
class AttackConfig:
    """One attack, evaluated in order; one record per (sample, attack) (docs/attacks.md)."""
    name: str                       # a registered attack (`advpure list`)
    params: dict[str, Any] = field(default_factory=dict)   # eps, steps, norm, ...; ℓ∞ sizes in [0, 1] or as 8/255
    # how gradients cross the purifier: auto (from its flags), full, bpda, or classifier
    # (preprocessor-blind: the attack sees the bare classifier)
    gradient: Literal[GRADIENT_REQUESTS] = "auto"
    eot: Positive = 1               # expectation over transformation: purifier draws averaged per gradient
    # purifier-parameter overrides for the purifier the attack's gradient goes through
    # (a cheaper surrogate, Lee & Kim 2023); evaluation always uses the real purifier
    surrogate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, config=STRICT)
class EvaluationConfig:
    """How samples are attacked, purified and decided."""
    runs: Positive = 1              # R: purification runs per sample, combined by the decision rule
    # AutoAttack-style cascade: each attack runs only on samples every earlier attack of the
    # same (norm, ε) failed to break; broken samples carry their breaking row forward. auto:
    # true when every attack entry comes from a preset whose reference runs that way
    # (autoattack_rand, autoattack_standard, diffpure2022), else false; resolved on loading
    cascade: bool | Literal["auto"] = "auto"
    # rows (samples × runs) per purifier/classifier call; auto: measured per worker (evaluation/row_chunks.py)
    max_rows: Positive | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: cuda when the worker has a GPU
    # how the R runs decide a prediction (robust = no confirmed break and this prediction right)
    decision: Literal[DECISIONS] = DEFAULT_DECISION
    # fresh draws of the real defense that confirm a break on a stochastic defense
    # (null: the attack's recheck_draws if set, else R); see docs/attacks.md
    confirm_draws: Positive | None = None
    # false (the clean gate, AutoAttack's convention): in the evaluate stage a sample the defended
    # model misclassifies clean (under `decision`) is not attacked and counts not robust, so
    # robust ≤ clean accuracy; true: every sample is attacked (the attack stage always does)
    attack_misclassified: bool = False
    # how the evaluate stage reaches a sample's clean and robust verdicts (docs/attacks.md,
    # "Verdicts"): runs — R-run evaluations of x and of the returned image decide, every
    # sample's per-run columns recorded; recheck — Hill et al.'s record: the first attack's EOT
    # forward of x nominates a misclassification and its re-check draws confirm it, and robust
    # is "no break confirmed at any step, the last iterate's included", with no R-run
    # evaluation (cheaper; optimistic where a nomination misses)
    verdict: Literal[VERDICTS] = "runs"
    # samples of each shard's first batch on which every attack is re-run with 2×EOT: a check
    # flags an attack whose robust accuracy drops by more than 2 points (0 = off)
    eot_probe: NonNegative = 0
    # samples of the whole job for the gradient-masking checks, spread over the shards in order
    # from each one's first batch (0 = off)
    check_samples: NonNegative = 16
    # speed (docs/performance.md): bf16 autocast of classifier and purifier networks (attack
    # arithmetic, projections, losses and records stay fp32); the networks' memory format;
    # torch.compile of the purifier's networks
    precision: Literal["fp32", "bf16"] = "fp32"
    # true: networks and their inputs channels-last; auto: the networks' weights channels-last
    # where each worker measures it faster (evaluation/memory_format.py); false: never
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False           # torch.compile the purifier's networks (see precision)


@dataclass(frozen=True, config=STRICT)
class ClusterConfig:
    """Where and how wide the job runs (docs/storage_and_cluster.md)."""
    address: str | None = None      # Ray address (null: RAY_ADDRESS, else a local cluster)
    # local: one worker in the driver's process, no Ray (small jobs); ray: worker actors;
    # auto: local when no cluster is named and num_workers is 1, else ray (the log says which)
    executor: Literal["auto", "local", "ray"] = "auto"
    # actors wanted; auto: as many as the cluster's nodes can host (grows when nodes join)
    num_workers: Positive | Literal["auto"] = 1
    cpus_per_worker: PositiveNumber = 1.0    # CPUs reserved per worker actor (reading and decoding shards)
    # auto: 1 if the cluster has GPUs, else 0
    gpus_per_worker: NonNegativeNumber | Literal["auto"] = "auto"
    # k > 1: k actors share each GPU (fractional GPUs 1/k) for models that are small
    workers_per_gpu: Positive = 1
    max_attempts: Positive = 3      # tries per shard before it is reported failed
    shard_timeout_s: PositiveNumber = 3600.0  # a shard running longer fails this attempt (its worker is killed)
    # give a busy worker its next shard with the current one, so it starts reading and
    # decoding it before the current shard ends (a hint: an idle worker may take it instead)
    prefetch_shards: bool = True
    max_actor_failures: Positive = 3   # workers that fail to start before the job is aborted
    # no live worker for this long while actors wait to be placed → abort (exit code 4)
    actor_start_timeout_s: PositiveNumber = 600.0
    # the job lease on job.output: renewed every lease_heartbeat_s; a lease whose heartbeat
    # is older than lease_timeout_s belongs to a dead driver and is taken over
    lease_timeout_s: Number = 120.0
    lease_heartbeat_s: PositiveNumber = 10.0   # how often the driver renews the lease (see lease_timeout_s)


@dataclass(frozen=True, config=STRICT)
class FaultConfig:
    """Injected failures for resilience testing: `times` failures on matching shards."""
    shard: str                      # the shard ids it fails (a glob)
    mode: Literal["raise", "exit", "hang"]   # raise an error, kill the worker process, or hang
    marker_dir: str                 # one marker file per failure claimed, so each happens once
    times: Positive = 1             # failures per matching shard


@dataclass(frozen=True, config=STRICT)
class CorpusConfig:
    """The offline corpus job (`advpure purify`, docs/corpus.md): size policy and encoding."""
    resize: Positive | None = None   # side of the square the purifier works at (null: native size)
    crop: bool = False              # centre-crop to resize×resize (shorter side scaled) instead of stretching
    restore_size: bool = False      # map the purified image back to the input's size
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"   # resampling (bicubic, bilinear antialiased)
    # JPEG and lossy WebP outputs; PNG and lossless WebP stay lossless
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    # the purifier's input channels (null: from its first convolution)
    channels: Annotated[Literal[1, 3] | None, BeforeValidator(_not_bool)] = None
    max_pixels: Positive = 4096 * 4096   # larger images become too_large rows, never decoded
    max_batch_pixels: Positive = 2**22   # purifier-input pixels per batch (memory only, not results)
    metrics: bool = True            # PSNR / SSIM between input and written output


@dataclass(frozen=True, config=STRICT)
class Config:
    job: JobConfig
    data: DataConfig
    # required for evaluation jobs; optional for a corpus job (a corpus may have no labels)
    classifier: ModelConfig | None = None
    purifier: ModelConfig = ModelConfig("none")
    attacks: tuple[AttackConfig, ...] = ()
    evaluation: EvaluationConfig = EvaluationConfig()
    cluster: ClusterConfig = ClusterConfig()
    faults: tuple[FaultConfig, ...] = ()
    corpus: CorpusConfig | None = None   # set only by corpus jobs
    source: str = field(default="<dict>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = _plain(dataclasses.asdict(self))
        d.pop("source")
        return d

    def hash(self) -> str:
        """Identity of the results: what changes a sample's outcome, not where or how fast."""
        d = self.to_dict()
        keep = {
            "seed": d["job"]["seed"],
            "stages": d["job"]["stages"],
            "max_samples_per_shard": d["data"]["max_samples_per_shard"],
            "classifier": d["classifier"],
            "purifier": d["purifier"],
            "attacks": d["attacks"],
            "runs": d["evaluation"]["runs"],
            "cascade": d["evaluation"]["cascade"],
            "decision": d["evaluation"]["decision"],
            "confirm_draws": d["evaluation"]["confirm_draws"],
        }
        gated = d["attacks"] and "evaluate" in d["job"]["stages"] and not d["evaluation"]["attack_misclassified"]
        if gated:  # the clean gate changes verdicts: jobs that attack every sample keep their old hashes
            keep["attack_misclassified"] = False
        if d["evaluation"]["verdict"] != "runs":   # changes verdicts; jobs judged by runs keep their hashes
            keep["verdict"] = d["evaluation"]["verdict"]
        if d["evaluation"].get("precision", "fp32") != "fp32":  # bf16 changes outcomes; fp32 hashes unchanged
            keep["precision"] = d["evaluation"]["precision"]
        if d["corpus"] is not None:  # absent from evaluation jobs: their hashes stay as they were
            keep["corpus"] = {k: v for k, v in d["corpus"].items() if k != "max_batch_pixels"}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- parsing

_CONFIG = pydantic.TypeAdapter(Config)


def _parse(data: dict[str, Any]) -> Config:
    """`data` as a Config, or the first problem as a ConfigError naming its key."""
    if "source" in data:                      # a field the loader sets, not a key of the file
        raise ConfigError(_unknown_key("source", "source", Config))
    _json_values(data, "")
    try:
        # JSON mode: strict about every value, while a mapping fills a section and a list a
        # tuple as in the YAML file (strict Python mode wants the dataclasses themselves)
        return _CONFIG.validate_json(json.dumps(data))
    except pydantic.ValidationError as err:
        raise ConfigError(_message(err.errors())) from None


def _json_values(node: Any, key: str) -> None:
    """Refuse, at its key, a value JSON has no type for (a YAML date: output: 2024-01-01)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _json_values(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _json_values(v, f"{key}[{i}]")
    elif not isinstance(node, (str, int, float, type(None))):
        raise ConfigError(f"{key}: expected a string, number, true/false or null, got {node!r} (quote it for text)")


def _fields(cls: type) -> dict[str, Any]:
    """A section's fields (pydantic FieldInfo: annotation, bounds), without the loader's own."""
    return {k: v for k, v in cls.__pydantic_fields__.items() if k != "source"}


def _section_in(tp: Any) -> type | None:
    """The section class a field holds (directly, in a list, or nullable), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    return next(filter(None, map(_section_in, typing.get_args(tp))), None)


def _locate(loc: tuple[int | str, ...]) -> tuple[str, type | None, str]:
    """pydantic's error location → (the dotted key as a user writes it, e.g. attacks[2].eot;
    the section holding its last name; that name). A union member's tag ends the walk."""
    key, section, owner, name = "", Config, None, ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            continue
        if section is None:               # inside a field: the rest tags a union member
            break
        key, owner, name = f"{key}.{part}" if key else part, section, part
        info = _fields(section).get(part)
        if info is None:                  # an unknown key
            break
        section = _section_in(info.annotation)
    return key, owner, name


_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "bool_type": "true/false", "string_type": "a string"}
_SIGNS = {"greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"),
          "less_than_equal": ("le", "≤"), "less_than": ("lt", "<")}


def _message(errors: list[ErrorDetails]) -> str:
    """pydantic's first error, worded as this loader words it: `key: what is wrong`. A union
    (`int ≥ 1 or auto`) fails once per member: its bound or value error says most."""
    key, section, name = _locate(errors[0]["loc"])
    err = min((e for e in errors if _locate(e["loc"])[0] == key), key=lambda e: e["type"] == "literal_error")
    kind, ctx, value = err["type"], err.get("ctx", {}), err["input"]
    if kind == "missing":
        return f"missing required key {key}"
    if kind == "unexpected_keyword_argument":
        return _unknown_key(key, name, section)
    info = _fields(section).get(name) if section is not None else None
    values, alternatives = _choices(info.annotation if info is not None else None)
    if kind in _EXPECTED:
        problem = f"expected {_EXPECTED[kind]}{alternatives}, got {value!r}"
    elif kind in ("dataclass_type", "dict_type"):
        problem = f"expected a mapping, got {type(value).__name__}"
    elif kind == "tuple_type":
        problem = f"expected a list, got {type(value).__name__} {value!r}"
    elif kind == "literal_error":
        problem = f"{value!r} is not one of {values}{alternatives}"
    elif kind in _SIGNS:
        attr, sign = _SIGNS[kind]
        interval = _interval(info.metadata) if info is not None else None
        problem = f"must be in {interval}" if interval else f"must be {sign} {_number(ctx[attr])}{alternatives}"
    elif kind == "too_short":
        problem = f"must name at least one {name.removesuffix('s')}"
    elif kind == "string_pattern_mismatch":     # NonBlank's pattern
        problem = "must not be empty"
    elif kind == "value_error":
        problem = str(ctx["error"])
    else:
        problem = err["msg"]
    return f"{key or 'top level'}: {problem}"


def _interval(metadata: list[Any]) -> str | None:
    """`[1, 100]` or `[0, 2^63)` for a field bounded on both sides (annotated_types bounds)."""
    b = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in metadata
         if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    if len(b) < 2:
        return None
    low = f"[{_number(b['ge'])}" if "ge" in b else f"({_number(b['gt'])}"
    return f"{low}, {_number(b['le'])}]" if "le" in b else f"{low}, {_number(b['lt'])})"


def _number(v: float) -> str:
    if isinstance(v, int) and v > 2**32 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"          # the seed's bound, as the docs write it
    return f"{v:g}"


def _choices(annotation: Any) -> tuple[list[Any], str]:
    """A field's Literal values, and what a number may also be: ` or auto`, ` or null`."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    values = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    numeric = any(typing.get_origin(a) is not Literal and a is not type(None) for a in args)
    words = [str(v) for v in values] if numeric else []
    return values, "".join(f" or {w}" for w in words + (["null"] if type(None) in args else []))


def _unknown_key(key: str, name: str, section: type) -> str:
    allowed = list(_fields(section))
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key}{hint} (allowed: {', '.join(allowed)})"


def _check_across_fields(cfg: Config) -> None:
    """What no single field's type or bound says."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    if cfg.classifier is None and cfg.corpus is None:
        raise ConfigError("missing required key classifier")
    c = cfg.cluster
    need(c.workers_per_gpu == 1 or c.gpus_per_worker in ("auto", 1.0), "cluster.workers_per_gpu",
         "k > 1 shares one GPU among k workers: needs gpus_per_worker auto or 1")
    need(c.lease_timeout_s >= 3 * c.lease_heartbeat_s, "cluster.lease_timeout_s",
         "must be ≥ 3 × cluster.lease_heartbeat_s (a live driver must renew well before it expires)")
    _check_local_executor(cfg, need)
    if cfg.corpus is not None:
        need(not cfg.corpus.crop or cfg.corpus.resize is not None, "corpus.crop", "needs corpus.resize")
        # the purified centre could not cover the whole input: its border would stay unpurified
        need(not (cfg.corpus.crop and cfg.corpus.restore_size), "corpus.restore_size",
             "cannot be combined with corpus.crop")


def _check_local_executor(cfg: Config, need) -> None:
    """What `cluster.executor: local` (one worker, in the driver's process) cannot do."""
    c = cfg.cluster
    if c.executor != "local":
        return
    need(c.num_workers in (1, "auto"), "cluster.num_workers",
         f"is {c.num_workers}, but cluster.executor local runs one worker in the driver's process "
         "(set num_workers 1, or executor ray)")
    need(c.address in (None, "", "local"), "cluster.address",
         f"names a Ray cluster ({c.address}), but cluster.executor is local (set executor ray or auto)")
    for i, f in enumerate(cfg.faults):
        need(f.mode == "raise", f"faults[{i}].mode",
             f"{f.mode} would end or hang the driver itself under cluster.executor local (use executor ray)")


def is_file_param(name: str) -> bool:
    return name == "checkpoint" or name.endswith("_checkpoint") or name.endswith("_path")


def _check_components(cfg: Config) -> None:
    """Names exist in the registries, params bind to the constructors (a purifier's: to its
    settings), files exist."""
    from pipeline.io import storage
    from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

    entries = [("purifier", PURIFIERS, cfg.purifier.name, cfg.purifier.params)]
    if cfg.classifier is not None:
        entries.insert(0, ("classifier", CLASSIFIERS, cfg.classifier.name, cfg.classifier.params))
    entries += [(f"attacks[{i}]", ATTACKS, a.name, a.params) for i, a in enumerate(cfg.attacks)]
    for key, registry, name, params in entries:
        try:
            ctor = registry.get(name)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from None
        if registry is not PURIFIERS:  # its settings are checked once fractions are read
            try:
                inspect.signature(ctor).bind(**params)
            except TypeError as err:
                sig = inspect.signature(ctor)
                raise ConfigError(f"{key}.params: {err} (accepted: {', '.join(sig.parameters) or 'none'})") from None
        for pname, value in params.items():
            if is_file_param(pname) and isinstance(value, str) and not storage.exists(value):
                raise ConfigError(f"{key}.params.{pname}: file not found: {value}")


def _takes_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return float in typing.get_args(annotation)
    return isinstance(annotation, str) and re.search(r"\bfloat\b", annotation) is not None


def _numbers_in(params: dict[str, Any], ctor: Any, where: str) -> dict[str, Any]:
    """`params` with fractions (`8/255`) read as numbers wherever the constructor takes a float."""
    try:
        sig = inspect.signature(ctor, eval_str=True)
    except (NameError, TypeError):
        sig = inspect.signature(ctor)
    out = dict(params)
    for name, value in params.items():
        p = sig.parameters.get(name)
        if not isinstance(value, str) or p is None or not _takes_float(p.annotation):
            continue
        parsed = parse_fraction(value, f"{where}.{name}")
        if parsed is None:
            raise ConfigError(f"{where}.{name}: expected a number or a fraction such as 8/255, got {value!r}")
        out[name] = parsed
    return out


# ℓ∞ budgets and step sizes are in image units (pixels in [0, 1]): above 1 they mean x/255
LINF_UNIT_PARAMS = ("eps", "step_size", "alpha")


def _check_attack(i: int, a: AttackConfig, ctor: Any) -> None:
    """The attack's parameters as its constructor judges them, and ℓ∞ sizes read as 0–255."""
    default = inspect.signature(ctor).parameters.get("norm")
    norm = a.params.get("norm", default.default if default is not None else "linf")
    for name in LINF_UNIT_PARAMS:
        v = a.params.get(name)
        if norm == "linf" and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1:
            raise ConfigError(f"attacks[{i}].params.{name}: {v:g} is outside [0, 1] (an ℓ∞ {name} is in "
                              f"image units, pixels in [0, 1]); did you mean {v:g}/255? (write {name}: {v:g}/255)")
    try:
        ctor(**a.params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"attacks[{i}].params: {err}") from None


def _resolve_params(cfg: Config) -> Config:
    """Component parameters as the constructors take them (fractions → floats), and every
    attack's parameters checked by building it (cheap: attacks hold no tensors). Unknown
    names are left to `_check_components`."""
    from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

    def ctor(registry: Any, name: str) -> Any:
        try:
            return registry.get(name)
        except KeyError:
            return None

    def model(key: str, m: ModelConfig | None, c: Any) -> ModelConfig | None:
        return m if m is None or c is None else dataclasses.replace(m, params=_numbers_in(m.params, c, f"{key}.params"))

    purifier_ctor = ctor(PURIFIERS, cfg.purifier.name)
    if purifier_ctor is not None and PURIFIERS.settings_entry(cfg.purifier.name) is not None:
        purifier_ctor = PURIFIERS.settings_entry(cfg.purifier.name).settings  # its fields are the params
    classifier_ctor = ctor(CLASSIFIERS, cfg.classifier.name) if cfg.classifier is not None else None
    attacks = []
    for i, a in enumerate(cfg.attacks):
        c = ctor(ATTACKS, a.name)
        if c is None:
            attacks.append(a)
            continue
        surrogate = (_numbers_in(a.surrogate, purifier_ctor, f"attacks[{i}].surrogate")
                     if purifier_ctor is not None else a.surrogate)
        a = dataclasses.replace(a, params=_numbers_in(a.params, c, f"attacks[{i}].params"), surrogate=surrogate)
        _check_attack(i, a, c)
        attacks.append(a)
    return dataclasses.replace(cfg, classifier=model("classifier", cfg.classifier, classifier_ctor),
                               purifier=model("purifier", cfg.purifier, purifier_ctor), attacks=tuple(attacks))


def _check_purifier_settings(cfg: Config) -> None:
    """purifier.params → the purifier's settings (pipeline.purifiers.base.PurifierSettings),
    and each attack's surrogate as overrides of those settings (dataclasses.replace)."""
    from pipeline.registry import PURIFIERS

    try:
        _, settings = PURIFIERS.parse(cfg.purifier.name, cfg.purifier.params, "purifier.params")
        for i, a in enumerate(cfg.attacks):
            if a.surrogate:
                settings.replace(a.surrogate, f"attacks[{i}].surrogate")
    except ValueError as err:  # SettingsError: names the dotted key
        raise ConfigError(str(err)) from None


def _check_verdict(cfg: Config) -> None:
    """`evaluation.verdict: recheck` judges a sample by the breaks its attacks confirm, so every
    attack must have checked the image it returns for any wrong class (FGSM returns an image it
    never evaluated; a targeted attack confirms only its target)."""
    if cfg.evaluation.verdict != "recheck":
        return
    from pipeline.registry import ATTACKS

    if not cfg.attacks:
        raise ConfigError("evaluation.verdict: recheck reads the attacks' confirmed breaks, but the job has no "
                          "attack (use verdict: runs)")
    if "evaluate" not in cfg.job.stages:   # attack and purify make no verdict of their own
        raise ConfigError(f"evaluation.verdict: recheck decides the evaluate stage's verdicts, but job.stages is "
                          f"{list(cfg.job.stages)} (the purify stage judges by R runs; use verdict: runs)")
    for i, a in enumerate(cfg.attacks):
        try:
            attack = ATTACKS.build(a.name, **a.params)
        except (KeyError, ValueError, TypeError):
            continue   # worded by _check_components / _check_attack
        if not attack.checks_returned_image:
            raise ConfigError(f"attacks[{i}]: {a.name} returns an image its forward never evaluated, so "
                              "evaluation.verdict: recheck could not judge it (use verdict: runs"
                              + (", or keep_broken: true)" if "keep_broken" in a.params else ")"))
        if not attack.judges_returned_image():
            raise ConfigError(f"attacks[{i}]: a targeted {a.name} confirms only its target class, so a returned "
                              "image misclassified as another class would count robust under "
                              "evaluation.verdict: recheck (use verdict: runs)")


def _expand_presets(data: dict[str, Any]) -> dict[str, Any]:
    """`attacks: [{preset: hill2021, overrides: {...}}, ...]` → the preset's attack entries."""
    attacks = data.get("attacks")
    if not isinstance(attacks, list) or not any(isinstance(a, dict) and "preset" in a for a in attacks):
        return data
    from pipeline.attacks.presets import expand_preset

    out = []
    for i, a in enumerate(attacks):
        if isinstance(a, dict) and "preset" in a:
            extra = sorted(set(a) - {"preset", "overrides"})
            if extra:
                raise ConfigError(f"attacks[{i}]: a preset entry takes only preset and overrides, not {extra}")
            try:
                out.extend(expand_preset(a["preset"], a.get("overrides") or {}))
            except (KeyError, ValueError, TypeError) as err:
                raise ConfigError(f"attacks[{i}].preset: {err}") from None
        else:
            out.append(a)
    return {**data, "attacks": out}


def _resolve_cascade(data: dict[str, Any]) -> dict[str, Any]:
    """`evaluation.cascade: auto` (the default) → true when every attack entry is a preset
    whose reference runs its entries as a cascade (AutoAttack's), else false."""
    ev = data.get("evaluation")
    if ev is None:
        ev = {}
    if not isinstance(ev, dict) or ev.get("cascade", "auto") != "auto":
        return data   # a wrong type is the parser's to word; an explicit value wins
    from pipeline.attacks.presets import runs_as_cascade

    attacks = data.get("attacks")
    names = [a.get("preset") for a in attacks if isinstance(a, dict)] if isinstance(attacks, list) else []
    on = isinstance(attacks, list) and len(names) == len(attacks) and runs_as_cascade(names)
    return {**data, "evaluation": {**ev, "cascade": on}}


def from_dict(data: dict[str, Any], source: str = "<dict>", check_components: bool = True) -> Config:
    try:
        cfg = dataclasses.replace(_parse(_expand_presets(_resolve_cascade(data))), source=source)
        _check_across_fields(cfg)
        if check_components:
            _check_components(cfg)
        cfg = _resolve_params(cfg)
        if check_components:
            _check_purifier_settings(cfg)
        _check_verdict(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b.c=value` (value parsed as YAML; list items by index: attacks.0.params.eps)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def load(path: str | Path, overrides: list[str] | None = None, check_components: bool = True) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    try:
        return from_dict(data, str(path), check_components)
    except ConfigError as err:
        hint = _prepare_hint(path.read_text(), str(err))
        if hint is None:
            raise
        raise ConfigError(f"{err}\n  {hint}") from None


def _prepare_hint(text: str, message: str) -> str | None:
    """For a missing file the config's own comments say how to make (the `Prepare:` lines of
    the shipped configs), that command: a fresh clone has no trained models yet."""
    match = re.search(r"file not found: (\S+)", message)
    if not match:
        return None
    missing = match.group(1)
    for line in text.splitlines():
        command = line.strip().lstrip("#").strip()
        if line.lstrip().startswith("#") and missing in command.split() and command.startswith(("advpure ", "python ")):
            return f"it is made by the command this config's header gives: {command}"
    where = "" if missing.startswith(("/", "s3://", "http://", "https://")) else f" (from {Path.cwd()})"
    return f"check the path{where}, or make the file first"


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
