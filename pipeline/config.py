"""Job configuration: YAML → frozen dataclasses, checked strictly before any work starts.

Every error names the file and the dotted key: an unknown key, a wrong type, a value out
of range, an unknown classifier/purifier/attack, parameters its constructor does not
take, or a checkpoint/shard file that does not exist.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline import stage_table
from pipeline.vocabulary import DECISIONS, DEFAULT_DECISION, GRADIENT_REQUESTS


class ConfigError(ValueError):
    """A configuration problem, with the file and key it concerns."""


@dataclass(frozen=True)
class JobConfig:
    """What the job is called, where its results go, and which stages it runs."""
    name: str                       # the job's name (records, manifest, report)
    output: str                     # results folder, local or s3:// (resumed if it holds this job)
    seed: int = 0                   # run seed: every random draw is keyed by (seed, sample key, purpose, index)
    stages: tuple[str, ...] = ("evaluate",)   # run in order, each resumed on its own (README, Stages)


@dataclass(frozen=True)
class DataConfig:
    """The input: WebDataset shards (advpure make-shards)."""
    shards: tuple[str, ...]         # shard paths or brace patterns (shard-{000000..000009}.tar), local, s3:// or https://
    index: str | None = None        # the shards' index.json (null: next to the shards)
    batch_size: int = 128           # samples per batch (memory and speed; noise is keyed per sample)
    max_samples_per_shard: int | None = None   # a quick job on the first samples of each shard (null: all)


@dataclass(frozen=True)
class ModelConfig:
    """A registered classifier or purifier (`advpure list`) and its parameters."""
    name: str                       # a registered name (`advpure list`); purifier none: no purification
    params: dict[str, Any] = field(default_factory=dict)   # constructor parameters (docs/ for each method)


@dataclass(frozen=True)
class AttackConfig:
    """One attack, evaluated in order; one record per (sample, attack) (docs/attacks.md)."""
    name: str                       # a registered attack (`advpure list`)
    params: dict[str, Any] = field(default_factory=dict)   # eps, steps, norm, ...; ℓ∞ sizes in [0, 1] or as 8/255
    # how gradients cross the purifier: auto (from its flags), full, bpda, or classifier
    # (preprocessor-blind: the attack sees the bare classifier)
    gradient: str = "auto"
    eot: int = 1                    # expectation over transformation: purifier draws averaged per gradient
    # purifier-parameter overrides for the purifier the attack's gradient goes through
    # (a cheaper surrogate, Lee & Kim 2023); evaluation always uses the real purifier
    surrogate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationConfig:
    """How samples are attacked, purified and decided."""
    runs: int = 1                   # R: purification runs per sample, combined by the decision rule
    # AutoAttack-style cascade: each attack runs only on samples every earlier attack of the
    # same (norm, ε) failed to break; broken samples carry their breaking row forward
    cascade: bool = False
    max_rows: int = 4096            # rows (samples × runs) per purifier/classifier call: memory only
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: cuda when the worker has a GPU
    # how the R runs decide a prediction (robust = no confirmed break and this prediction right)
    decision: Literal[DECISIONS] = DEFAULT_DECISION
    # fresh draws of the real defense that confirm a break on a stochastic defense
    # (null: the attack's recheck_draws if set, else R); see docs/attacks.md
    confirm_draws: int | None = None
    # samples of each shard's first batch on which every attack is re-run with 2×EOT: a check
    # flags an attack whose robust accuracy drops by more than 2 points (0 = off)
    eot_probe: int = 0
    # samples of the whole job for the gradient-masking checks, spread over the shards in order
    # from each one's first batch (0 = off)
    check_samples: int = 16
    # speed on accelerators (docs/performance.md): bf16 autocast of classifier and purifier
    # networks (attack arithmetic, projections, losses and records stay fp32); channels_last
    # memory format for the networks and their inputs; torch.compile of the purifier's networks
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False     # channels_last memory format (see precision)
    compile: bool = False           # torch.compile the purifier's networks (see precision)


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how wide the job runs (docs/storage_and_cluster.md)."""
    address: str | None = None      # Ray address (null: RAY_ADDRESS, else a local cluster)
    # local: one worker in the driver's process, no Ray (small jobs); ray: worker actors;
    # auto: local when no cluster is named and num_workers is 1, else ray (the log says which)
    executor: Literal["auto", "local", "ray"] = "auto"
    # actors wanted; auto: as many as the cluster's nodes can host (grows when nodes join)
    num_workers: Union[int, Literal["auto"]] = 1
    cpus_per_worker: float = 1.0    # CPUs reserved per worker actor (reading and decoding shards)
    gpus_per_worker: Union[float, Literal["auto"]] = "auto"   # auto: 1 if the cluster has GPUs, else 0
    # k > 1: k actors share each GPU (fractional GPUs 1/k) for models that are small
    workers_per_gpu: int = 1
    max_attempts: int = 3           # tries per shard before it is reported failed
    shard_timeout_s: float = 3600.0  # a shard running longer fails this attempt (its worker is killed)
    # give a busy worker its next shard with the current one, so it starts reading and
    # decoding it before the current shard ends (a hint: an idle worker may take it instead)
    prefetch_shards: bool = True
    max_actor_failures: int = 3     # workers that fail to start before the job is aborted
    # no live worker for this long while actors wait to be placed → abort (exit code 4)
    actor_start_timeout_s: float = 600.0
    # the job lease on job.output: renewed every lease_heartbeat_s; a lease whose heartbeat
    # is older than lease_timeout_s belongs to a dead driver and is taken over
    lease_timeout_s: float = 120.0
    lease_heartbeat_s: float = 10.0   # how often the driver renews the lease (see lease_timeout_s)


@dataclass(frozen=True)
class FaultConfig:
    """Injected failures for resilience testing: `times` failures on matching shards."""
    shard: str                      # the shard ids it fails (a glob)
    mode: Literal["raise", "exit", "hang"]   # raise an error, kill the worker process, or hang
    marker_dir: str                 # one marker file per failure claimed, so each happens once
    times: int = 1                  # failures per matching shard


@dataclass(frozen=True)
class CorpusConfig:
    """The offline corpus job (`advpure purify`, docs/corpus.md): size policy and encoding."""
    resize: int | None = None       # side of the square the purifier works at (null: native size)
    crop: bool = False              # centre-crop to resize×resize (shorter side scaled) instead of stretching
    restore_size: bool = False      # map the purified image back to the input's size
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"   # resampling (bicubic, bilinear antialiased)
    jpeg_quality: int = 95          # JPEG and lossy WebP outputs; PNG and lossless WebP stay lossless
    channels: int | None = None     # the purifier's input channels (null: from its first convolution)
    max_pixels: int = 4096 * 4096   # larger images become too_large rows, never decoded
    max_batch_pixels: int = 2**22   # purifier-input pixels per batch (memory only, not results)
    metrics: bool = True            # PSNR / SSIM between input and written output


@dataclass(frozen=True)
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

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if origin is tuple and args and args[0] is str and isinstance(value, str):
                value = [value]  # a single string where a list of strings is expected
            else:
                raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and parse_fraction(value, where) is not None:
            return parse_fraction(value, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


_FRACTION = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*")


def parse_fraction(value: str, where: str = "") -> float | None:
    """`8/255` (or `0.5/255`) → the nearest float to the exact quotient; None when `value` is
    not a fraction. YAML reads `8/255` as a string; ε is conventionally written so."""
    m = _FRACTION.fullmatch(value)
    if m is None:
        return None
    den = Fraction(m[2])
    if den == 0:
        raise ConfigError(f"{where}: {value!r} divides by zero")
    return float(Fraction(m[1]) / den)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    if cfg.classifier is None and cfg.corpus is None:
        raise ConfigError("missing required key classifier")
    need(bool(cfg.job.name.strip()), "job.name", "must not be empty")
    need(bool(cfg.job.output.strip()), "job.output", "must not be empty")
    need(0 <= cfg.job.seed < 2**63, "job.seed", "must be in [0, 2^63)")
    need(len(cfg.job.stages) > 0, "job.stages", "must name at least one stage")
    stages = stage_table.job_stages()
    for i, s in enumerate(cfg.job.stages):
        need(s in stages, f"job.stages[{i}]", f"{s!r} is not one of {list(stages)}")
    need(len(cfg.data.shards) > 0, "data.shards", "must name at least one shard")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be ≥ 1")
    if cfg.data.max_samples_per_shard is not None:
        need(cfg.data.max_samples_per_shard >= 1, "data.max_samples_per_shard", "must be ≥ 1")
    for i, a in enumerate(cfg.attacks):
        need(a.gradient in GRADIENT_REQUESTS, f"attacks[{i}].gradient",
             f"{a.gradient!r} is not one of {list(GRADIENT_REQUESTS)}")
        need(a.eot >= 1, f"attacks[{i}].eot", "must be ≥ 1")
    need(cfg.evaluation.runs >= 1, "evaluation.runs", "must be ≥ 1")
    need(cfg.evaluation.max_rows >= 1, "evaluation.max_rows", "must be ≥ 1")
    ev = cfg.evaluation
    need(ev.confirm_draws is None or ev.confirm_draws >= 1, "evaluation.confirm_draws", "must be ≥ 1 or null")
    need(ev.eot_probe >= 0, "evaluation.eot_probe", "must be ≥ 0")
    need(ev.check_samples >= 0, "evaluation.check_samples", "must be ≥ 0 (0: no gradient-masking checks)")
    c = cfg.cluster
    need(c.num_workers == "auto" or c.num_workers >= 1, "cluster.num_workers", "must be ≥ 1 or auto")
    need(c.workers_per_gpu >= 1, "cluster.workers_per_gpu", "must be ≥ 1")
    need(c.workers_per_gpu == 1 or c.gpus_per_worker in ("auto", 1.0), "cluster.workers_per_gpu",
         "k > 1 shares one GPU among k workers: needs gpus_per_worker auto or 1")
    need(c.actor_start_timeout_s > 0, "cluster.actor_start_timeout_s", "must be > 0")
    need(c.lease_heartbeat_s > 0, "cluster.lease_heartbeat_s", "must be > 0")
    need(c.lease_timeout_s >= 3 * c.lease_heartbeat_s, "cluster.lease_timeout_s",
         "must be ≥ 3 × cluster.lease_heartbeat_s (a live driver must renew well before it expires)")
    need(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
    need(c.gpus_per_worker == "auto" or c.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be ≥ 0 or auto")
    need(c.max_attempts >= 1, "cluster.max_attempts", "must be ≥ 1")
    need(c.shard_timeout_s > 0, "cluster.shard_timeout_s", "must be > 0")
    need(c.max_actor_failures >= 1, "cluster.max_actor_failures", "must be ≥ 1")
    for i, f in enumerate(cfg.faults):
        need(f.times >= 1, f"faults[{i}].times", "must be ≥ 1")
    _check_local_executor(cfg, need)
    if cfg.corpus is not None:
        _check_corpus(cfg.corpus, need)


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


def _check_corpus(c: CorpusConfig, need) -> None:
    need(c.resize is None or c.resize >= 1, "corpus.resize", "must be ≥ 1 or null")
    need(not c.crop or c.resize is not None, "corpus.crop", "needs corpus.resize")
    # the purified centre could not cover the whole input: its border would stay unpurified
    need(not (c.crop and c.restore_size), "corpus.restore_size", "cannot be combined with corpus.crop")
    need(1 <= c.jpeg_quality <= 100, "corpus.jpeg_quality", "must be in [1, 100]")
    need(c.channels in (None, 1, 3), "corpus.channels", "must be 1, 3 or null")
    need(c.max_pixels >= 1, "corpus.max_pixels", "must be ≥ 1")
    need(c.max_batch_pixels >= 1, "corpus.max_batch_pixels", "must be ≥ 1")


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


def from_dict(data: dict[str, Any], source: str = "<dict>", check_components: bool = True) -> Config:
    try:
        data = _expand_presets(data)
        cfg = _build(Config, data, "")
        cfg = dataclasses.replace(cfg, source=source)
        _check_ranges(cfg)
        if check_components:
            _check_components(cfg)
        cfg = _resolve_params(cfg)
        if check_components:
            _check_purifier_settings(cfg)
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
