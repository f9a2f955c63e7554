"""The corpus job: `advpure purify SHARDS OUTPUT` as a config, a driver stage, indexes and a manifest.

The job is one stage, `purify_corpus`, run on `CorpusWorker`s by the job runner every job
shares (`pipeline.run.job_runner`: lease, the data check on a worker — here that corpus.resize
fits the purifier —, job state, manifest) and the same results protocol: a shard is done iff
its commit marker exists, a re-run skips committed shards, a failing shard is retried and
then quarantined with its reason. `CorpusJob` adds what is the corpus's own: its plan of
shards, the clean-up of quarantined shards' outputs, the indexes and the manifest's summary.
Torch-free, like the driver. Output layout under OUTPUT:

  <shard>.tar                 purified shards, the input's names, keys and fields
  index.json                  advpure shard index (names, sample counts, sha256)
  wids-index.json             wids shard index (url, nsamples, filesize, sha256)
  purify_corpus/*.parquet     one record per sample (schema.CORPUS_SCHEMA), marker last
  manifest.json               per shard: status, attempts, errors; samples ok / dropped and why
  job.json, config.yaml       the job's identity (config hash) and its full config
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import yaml

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.corpus import EXAMPLE_KEYS, STAGE
from pipeline.io import shards, storage
from pipeline.run import commit, data_identity
from pipeline.run.actor_host import WorkerKind
from pipeline.run.job_runner import JobRunner
from pipeline.run.scheduler import ShardState, StageResult

log = logging.getLogger(__name__)

WIDS_INDEX = "wids-index.json"
WIDS_KIND = "wids-shard-index-v1"


def build_config(shard_pattern: str, output: str, *, config_path: str | None = None,
                 overrides: list[str] | None = None, purifier: str | None = None,
                 params: dict[str, Any] | None = None, classifier: str | None = None,
                 classifier_params: dict[str, Any] | None = None,
                 corpus: dict[str, Any] | None = None) -> Config:
    """The job's Config: the YAML's sections (as for `advpure run`; no attacks), then the
    command line on top. `corpus` holds the size-policy / encoding options given (None = unset)."""
    data: dict[str, Any] = {}
    if config_path is not None:
        if not storage.exists(config_path):
            raise ConfigError(f"config file not found: {config_path}")
        try:
            data = yaml.safe_load(storage.read_text(config_path)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{config_path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_path}: top level must be a mapping of sections")
    data = config_mod.apply_overrides(data, list(overrides or []))
    source = config_path or "<advpure purify>"
    if data.get("attacks"):
        raise ConfigError(f"{source}: attacks: `advpure purify` runs no attacks (use `advpure run`)")
    data["job"] = {"name": "purify", **(data.get("job") or {}), "output": output, "stages": ["purify"]}
    data["data"] = {**(data.get("data") or {}), "shards": shard_pattern}
    if data["data"].get("max_samples_per_shard") is not None:
        raise ConfigError(f"{source}: data.max_samples_per_shard: a corpus job keeps every sample")
    for key, name, given in (("purifier", purifier, params), ("classifier", classifier, classifier_params)):
        section = dict(data.get(key) or {})
        if name is not None and name != section.get("name"):
            section = {"name": name, "params": {}}   # another component: the YAML's params were for the old one
        if given:
            section["params"] = {**(section.get("params") or {}), **given}
        if section:
            data[key] = section
    if not (data.get("purifier") or {}).get("name"):   # the config's default, `none`, would only re-encode
        raise ConfigError(f"{source}: no purifier: give --purifier NAME (registered ones: `advpure list`) "
                          "or a purifier: section in --config; `--purifier none` re-encodes and validates only")
    data["corpus"] = {**(data.get("corpus") or {}), **{k: v for k, v in (corpus or {}).items() if v is not None}}
    return config_mod.from_dict(data, source)


def output_url(cfg: Config, sid: str) -> str:
    return storage.join(cfg.job.output, f"{sid}.tar")


def index_entries(urls: list[str], index: str | None) -> dict[str, dict[str, Any] | None]:
    """{shard URL: its index entry} from `index` (advpure index.json or a wids shard index)
    or the index.json beside each shard; None where none names it (the worker counts while
    reading, the data's identity comes from the file)."""
    if index is not None:
        doc = json.loads(storage.read_text(index))
        if isinstance(doc, dict) and "shardlist" in doc:
            by_name = {storage.basename(e["url"]): e for e in doc["shardlist"]}
            return {u: by_name.get(storage.basename(u)) for u in urls}
    return data_identity.index_entries(urls, index)


def expected_counts(urls: list[str], index: str | None) -> dict[str, int | None]:
    """Samples per shard from an index when there is one (advpure `samples` or wids
    `nsamples`); otherwise None: the worker counts while reading."""
    def count(e: dict[str, Any] | None) -> int | None:
        n = (e or {}).get("samples", (e or {}).get("nsamples"))
        return int(n) if n is not None else None
    return {u: count(e) for u, e in index_entries(urls, index).items()}


def plan(cfg: Config) -> list[ShardState]:
    urls = shards.expand(cfg.data.shards)
    missing = [u for u in urls if not storage.exists(u)]
    if missing:
        raise ConfigError(f"{cfg.source}: data.shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    sids = shards.unique_ids(urls)
    clash = [u for u, sid in zip(urls, sids) if output_url(cfg, sid) == u]
    if clash:
        raise ConfigError(f"{cfg.source}: job.output {cfg.job.output} would overwrite input shard {clash[0]}")
    counts = expected_counts(urls, cfg.data.index)
    return [ShardState(u, sid, counts[u]) for u, sid in zip(urls, sids)]


def run(cfg: Config) -> tuple[int, dict[str, Any]]:
    """Run (or resume) the corpus job; returns (exit code, manifest)."""
    if cfg.corpus is None:
        raise ConfigError(f"{cfg.source}: not a corpus job (no corpus section)")
    return CorpusJob(cfg).run()


class CorpusJob(JobRunner):
    """The corpus job's answers to the runner's hooks."""

    worker = WorkerKind("pipeline.corpus.worker:CorpusWorker")

    def plan(self) -> list[ShardState]:
        return plan(self.cfg)

    def stages(self) -> Sequence[str]:
        return (STAGE,)

    def index_entries(self, states: list[ShardState]) -> dict[str, dict[str, Any] | None]:
        return index_entries([s.url for s in states], self.cfg.data.index)   # a wids index too

    def after_stage(self, result: StageResult) -> None:
        markers = commit.committed(self.cfg.job.output, STAGE)
        for sid in result.quarantined:  # a shard put by an attempt that never committed is no output
            if sid not in markers:
                storage.remove(output_url(self.cfg, sid))
        write_indexes(self.cfg, markers)

    def manifest_extra(self, results: list[StageResult], finished: bool) -> dict[str, Any]:
        markers = commit.committed(self.cfg.job.output, STAGE) if finished else {}
        return {"corpus": corpus_summary(self.cfg, results[-1], markers)}


def write_indexes(cfg: Config, markers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """index.json (advpure) and wids-index.json for the committed output shards."""
    entries = sorted((e for m in markers.values() for e in m.get("outputs", [])), key=lambda e: e["name"])
    shards.write_index(cfg.job.output, entries, {"stage": STAGE, "job": cfg.job.name, "config_hash": cfg.hash()})
    wids = {"__kind__": WIDS_KIND, "wids_version": 1, "name": cfg.job.name,
            # relative urls: wids resolves them against the index's own location
            "shardlist": [{"url": e["name"], "nsamples": e["samples"], "filesize": e["bytes"], "sha256": e["sha256"]}
                          for e in entries]}
    storage.put_text(storage.join(cfg.job.output, WIDS_INDEX), json.dumps(wids, indent=1))
    return entries


def corpus_summary(cfg: Config, result: StageResult, markers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the output holds against what came in: per shard and in all, ok and dropped by reason."""
    per_shard: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    examples: dict[str, dict[str, Any]] = {}   # per reason: the first keys in shard order and the first error
    for sid, m in sorted(markers.items()):
        out = (m.get("outputs") or [{}])[0]
        per_shard[sid] = {"samples": m.get("samples", 0), "ok": m.get("ok", 0), "dropped": m.get("dropped", {}),
                          "output": out.get("name"), "empty": m.get("samples", 0) == 0,
                          "non_file_members": m.get("non_file_members", 0)}
        for reason, n in m.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + n
        for reason, ex in m.get("dropped_examples", {}).items():
            into = examples.setdefault(reason, {"keys": [], "error": ex.get("error")})
            into["keys"] += ex["keys"][:EXAMPLE_KEYS - len(into["keys"])]
    quarantined = {sid: (result.shards[sid].errors or [""])[-1] for sid in result.quarantined}
    return {"output": cfg.job.output, "wids_index": storage.join(cfg.job.output, WIDS_INDEX),
            "shards_in": len(result.shards), "shards_out": len(markers), "quarantined": quarantined,
            "samples": sum(s["samples"] for s in per_shard.values()),
            "ok": sum(s["ok"] for s in per_shard.values()), "dropped": dict(sorted(dropped.items())),
            "dropped_examples": dict(sorted(examples.items())), "shards": per_shard}


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """`key=value` words → {key: value}, each value read as YAML (0.25 → float, true → bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def format_outcome(manifest: dict[str, Any]) -> str:
    """A few lines for the terminal: what was written, what was dropped and why, what failed."""
    st = manifest.get("stages", {}).get(STAGE, {})
    if st.get("aborted"):
        return f"{STAGE} ABORTED: {st['aborted']}"
    c = manifest["corpus"]
    lines = [f"purified {c['ok']} of {c['samples']} samples into {c['shards_out']} of {c['shards_in']} shards: "
             f"{c['output']}", f"indexes: {c['wids_index']}, {storage.join(c['output'], shards.INDEX_NAME)}"]
    if c["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in c["dropped"].items())
                     + f"  (why, per sample: the records under {storage.join(c['output'], STAGE)})")
        examples = c.get("dropped_examples", {})
        lines += [_dropped_line(reason, n, examples.get(reason)) for reason, n in c["dropped"].items()]
    for sid, reason in c["quarantined"].items():
        lines.append(f"shard {sid} QUARANTINED: {reason}")
    return "\n".join(lines)


def _dropped_line(reason: str, n: int, example: dict[str, Any] | None) -> str:
    """`  reason n: key, key, … and k more — first key: its error` (the keys a user looks up)."""
    if not example or not example.get("keys"):
        return f"  {reason} {n}"
    keys = ", ".join(example["keys"]) + (f" and {n - len(example['keys'])} more" if n > len(example["keys"]) else "")
    return f"  {reason} {n}: {keys}" + (f" — {example['keys'][0]}: {example['error']}" if example.get("error") else "")
