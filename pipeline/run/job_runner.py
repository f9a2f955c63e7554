"""A job's life around its stages, the same for every kind of job (the evaluation job,
`driver.EvaluationJob`; the corpus job, `corpus.job.CorpusJob`):

  plan the shards → take the job lease (an unwritable output: ConfigError, before any work)
  → the data check on the job's first worker (`scheduler.check_data_on_a_worker`), when a
  stage has work → after a takeover, TAKEOVER_GRACE_S → the output's job state
  (`check_job_state`: same config, same data) → the stages in order on one pool of workers
  → the manifest. A stage that aborts (DriverError) ends the job with exit 4 and a manifest;
  a lost lease ends it with exit 4 and no manifest (the output is no longer ours to write).

A kind of job subclasses `JobRunner` and answers its hooks: `plan`, `worker`, and where it
differs, `index_entries`, `stage_inputs`, `after_stage`, `manifest_extra`. Torch-free.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Sequence

from pipeline import config as config_mod
from pipeline import stage_table
from pipeline.config import Config, ConfigError
from pipeline.io import storage
from pipeline.run import commit, data_identity
from pipeline.run import lease as lease_mod
from pipeline.run.actor_host import SHARD_WORKER, WorkerKind
from pipeline.run.lease import Lease, LeaseLost
from pipeline.run.scheduler import DriverError, JobActors, ShardState, StageResult, check_data_on_a_worker, run_stage

log = logging.getLogger(__name__)

EXIT_OK, EXIT_QUARANTINED, EXIT_ABORTED = 0, 3, 4

# a driver that took the lease from a dead process on this machine waits this long before
# cleaning a stage, so that the dead driver's workers (killed by Ray when their owner dies)
# cannot write a Parquet file after the clean-up and then a marker naming it
TAKEOVER_GRACE_S = 3.0


class JobRunner:
    """One job's lifecycle (see the module doc); subclasses supply what differs."""

    worker: WorkerKind = SHARD_WORKER

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- hooks -----------------------------------------------------------------------------

    def plan(self) -> list[ShardState]:
        """The job's input shards (a missing one: ConfigError)."""
        raise NotImplementedError

    def stages(self) -> Sequence[str]:
        return self.cfg.job.stages

    def index_entries(self, states: list[ShardState]) -> dict[str, dict[str, Any] | None] | None:
        """The shards' index entries for the job state (None: the index beside the shards)."""
        return None

    def stage_inputs(self, stage: str, states: list[ShardState]) -> list[ShardState]:
        return states

    def after_stage(self, result: StageResult) -> None:
        """What a stage that ran to its end leaves besides its records (indexes, ...)."""

    def manifest_extra(self, results: list[StageResult], finished: bool) -> dict[str, Any]:
        """Keys the manifest carries besides the stages'."""
        return {}

    # -- the lifecycle ---------------------------------------------------------------------

    def run(self) -> tuple[int, dict[str, Any]]:
        """Run (or resume) the job; returns (exit code, manifest)."""
        states = self.plan()
        c = self.cfg.cluster
        try:
            lease = lease_mod.acquire(self.cfg.job.output, self.cfg.job.name, c.lease_timeout_s, c.lease_heartbeat_s)
        except storage.StorageError as err:  # the first write to the output: fail before any work
            raise ConfigError(f"{self.cfg.source}: {err}") from None
        with lease:
            actors = JobActors(self.cfg, self.worker)
            try:
                return self._run_stages(states, lease, actors)
            finally:
                actors.close()

    def _prepare(self, states: list[ShardState], lease: Lease, actors: JobActors, pending: dict[str, int]) -> None:
        """Before any stage: the data check on a worker (only when a stage has work: a worker
        is started for it, and kept for the stages), then the output's job state."""
        if any(pending.values()):
            check_data_on_a_worker(self.cfg, actors, states[0].url, max(pending.values()), lease)
        if lease.took_over:
            time.sleep(TAKEOVER_GRACE_S)
        check_job_state(self.cfg, states, self.index_entries(states))

    def _pending(self, states: list[ShardState]) -> dict[str, int]:
        """Per stage, the input shards it has not committed (read-only, before the lease's
        clean-up: it decides whether to start a worker for the data check)."""
        sids = {s.sid for s in states}
        return {stage: len(sids - set(commit.committed(self.cfg.job.output, stage))) for stage in self.stages()}

    def _run_stages(self, states: list[ShardState], lease: Lease, actors: JobActors) -> tuple[int, dict[str, Any]]:
        results: list[StageResult] = []
        pending = self._pending(states)
        stage = next((st for st, n in pending.items() if n), self.stages()[0])   # a failed start aborts it
        inputs: list[ShardState] = []
        try:
            self._prepare(states, lease, actors, pending)
            for stage in self.stages():
                inputs = self.stage_inputs(stage, states)
                results.append(run_stage(self.cfg, stage, inputs, self.worker, lease=lease, actors=actors))
                self.after_stage(results[-1])
        except (DriverError, LeaseLost) as err:
            log.error("%s aborted: %s", stage, err)
            results.append(StageResult(stage, {s.sid: s for s in inputs}, 0.0, aborted=str(err)))
            if isinstance(err, LeaseLost):  # the output is no longer ours to write: no manifest
                return EXIT_ABORTED, {"stages": {r.stage: {"aborted": r.aborted} for r in results}}
            actors.close()
            return EXIT_ABORTED, self.write_manifest(results, finished=False)
        actors.close()   # before the manifest: the job's workers end with its last stage
        code = EXIT_QUARANTINED if any(r.quarantined for r in results) else EXIT_OK
        return code, self.write_manifest(results, finished=True)

    def write_manifest(self, results: list[StageResult], finished: bool) -> dict[str, Any]:
        doc = manifest(self.cfg, results)
        doc.update(self.manifest_extra(results, finished))
        try:
            storage.put_text(storage.join(self.cfg.job.output, "manifest.json"), json.dumps(doc, indent=1))
        except OSError as err:  # a full disk must not hide the outcome: the markers are the results
            log.error("could not write the manifest of %s: %s", self.cfg.job.output, err)
            doc["manifest_error"] = str(err)
        return doc


def manifest(cfg: Config, results: list[StageResult]) -> dict[str, Any]:
    """The job's outcome per stage: seconds, abort reason, quarantined shards, checks, workers,
    and per shard its status, attempts, rows, errors and source."""
    return {
        "job": cfg.job.name,
        "config_hash": cfg.hash(),
        "finished": time.time(),
        "stages": {
            r.stage: {
                "seconds": r.seconds,
                "aborted": r.aborted,
                "quarantined": r.quarantined,
                "checks": r.checks,
                "workers": r.workers,
                "shards": {s.sid: {"status": s.status, "attempts": s.attempts, "rows": s.rows,
                                   "errors": s.errors, "source": s.url} for s in r.shards.values()},
            } for r in results
        },
    }


# ---------------------------------------------------------------------------- job state

def check_job_state(cfg: Config, states: list[ShardState],
                    entries: dict[str, dict[str, Any] | None] | None = None) -> None:
    """Refuse to mix results of another configuration or other data in the same output;
    record ours. The data is identified per shard (`data_identity`; `entries`: the shards'
    index entries when the caller read them, else the index beside the shards). An output
    where nothing was committed holds no results: a new config or data takes it over."""
    out = cfg.job.output
    job_url = storage.join(out, "job.json")
    urls = [s.url for s in states]
    if entries is None:
        entries = data_identity.index_entries(urls, cfg.data.index)
    data = data_identity.shard_identities(urls, [s.sid for s in states], entries)
    prev = json.loads(storage.read_text(job_url)) if storage.exists(job_url) else None
    if prev is not None:
        problem = _job_mismatch(cfg, prev, data)
        held = commit.committed_counts(out) if problem else {}
        if problem and any(held.values()):
            raise ConfigError(f"{cfg.source}: {problem}")
        if problem:
            log.warning("output %s: %s; no shard was committed there, so this job takes it over", out, problem)
    if prev is None or prev.get("config_hash") != cfg.hash() or prev.get("data") != data:
        created = prev.get("created") if prev is not None and prev.get("config_hash") == cfg.hash() else None
        storage.put_text(job_url, json.dumps({"job": cfg.job.name, "config_hash": cfg.hash(),
                                              "created": created or time.time(), "data": data}))
    storage.put_text(storage.join(out, "config.yaml"), config_mod.dump(cfg))


# settings whose defaults changed since outputs were written: the older protocol, as a config
# that resumes such an output (the clean gate; `cascade: auto` for AutoAttack's presets)
OLDER_DEFAULTS = ({"attack_misclassified": True}, {"attack_misclassified": True, "cascade": False})


def _older_protocol(cfg: Config, held_hash: str | None) -> dict[str, Any] | None:
    """The evaluation settings under which cfg hashes to `held_hash` (an output made with an
    older default), or None."""
    for settings in OLDER_DEFAULTS:
        older = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, **settings))
        if older.hash() == held_hash:
            return settings
    return None


def _job_mismatch(cfg: Config, prev: dict[str, Any], data: dict[str, dict[str, Any]]) -> str | None:
    """Why an output's job.json does not describe this job (None when it does)."""
    out = cfg.job.output
    fix = f"use a new job.output, or remove {out} to start over"
    if prev.get("config_hash") != cfg.hash():
        older = _older_protocol(cfg, prev.get("config_hash"))
        if older is not None:
            settings = " and ".join(f"evaluation.{k}: {str(v).lower()}" for k, v in older.items())
            fix = (f"its results were made with {settings} (the defaults before the clean gate and the "
                   f"presets' cascade): set {'them' if len(older) > 1 else 'it'} to resume them, or {fix}")
        return (f"output {out} holds results of config hash {prev.get('config_hash')} but this config "
                f"hashes to {cfg.hash()}; {fix}")
    if "data" not in prev:   # written before data was recorded: nothing to compare
        return None
    changes = data_identity.diff(prev["data"], data)
    if changes.changed:   # new bytes for a shard with no committed results: a repaired (quarantined) shard
        held = set().union(*(commit.committed(out, stage) for stage in stage_table.result_stages()))
        changes.changed = [sid for sid in changes.changed if sid in held]
    if changes:
        return (f"output {out} holds results for other data than data.shards names: {changes.describe()}; "
                f"resume with the data it was made from, or {fix}")
    return None
