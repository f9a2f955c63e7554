"""The evaluation job (`advpure run`): its shards, its stages in the order `job.stages` names
them, and the image shards a stage publishes for the next. The lifecycle around the stages
(lease, data check, job state, manifest) is `job_runner`'s; a stage's scheduling is
`scheduler`'s. Torch-free: on Ray the workers import torch in their own processes.
"""
from __future__ import annotations

from typing import Any

from pipeline import stage_table
from pipeline.config import Config, ConfigError
from pipeline.io import shards, storage
from pipeline.run import commit
from pipeline.run.job_runner import EXIT_ABORTED, EXIT_OK, EXIT_QUARANTINED, JobRunner  # noqa: F401 - run's codes
from pipeline.run.scheduler import ShardState, StageResult


def run(cfg: Config) -> tuple[int, dict[str, Any]]:
    """Run (or resume) the job's stages in order, each resumed independently; returns (exit
    code, manifest). A stage reads the image shards of the stage its table entry `reads` when
    the job ran that one earlier (purify: an attack stage's adversarial shards), else
    data.shards (for purify: an adversarial set from another job, or any corpus to purify
    offline). Everything that writes to job.output runs under the job lease
    (`pipeline.run.lease`): a second driver on the same output raises LeaseHeld."""
    return EvaluationJob(cfg).run()


class EvaluationJob(JobRunner):
    """The evaluation job's answers to the runner's hooks (ShardWorker is the runner's default)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.published: dict[str, list[ShardState]] = {}   # the image shards each finished stage wrote

    def plan(self) -> list[ShardState]:
        return plan_shards(self.cfg)

    def stage_inputs(self, stage: str, states: list[ShardState]) -> list[ShardState]:
        inputs = self.published.get(stage_table.get(stage).reads or "", states)
        return [ShardState(s.url, s.sid, s.expected) for s in inputs]

    def after_stage(self, result: StageResult) -> None:
        if stage_table.get(result.stage).images is not None:
            self.published[result.stage] = publish_outputs(self.cfg, result.stage)


def plan_shards(cfg: Config) -> list[ShardState]:
    urls = shards.expand(cfg.data.shards)
    missing = [u for u in urls if not storage.exists(u)]
    if missing:
        raise ConfigError(f"{cfg.source}: data.shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    counts = shards.expected_counts(urls, cfg.data.index)
    return [ShardState(u, sid, counts[u]) for u, sid in zip(urls, shards.unique_ids(urls))]


def publish_outputs(cfg: Config, stage: str) -> list[ShardState]:
    """Index the image shards a stage wrote (its table entry's folder) from its commit
    markers, and return them as a later stage's input."""
    images = stage_table.get(stage).images
    assert images is not None, stage
    folder = storage.join(cfg.job.output, images.folder)
    entries = sorted((e for m in commit.committed(cfg.job.output, stage).values() for e in m.get("outputs", [])),
                     key=lambda e: e["name"])
    shards.write_index(folder, entries, {"stage": stage, "job": cfg.job.name, "config_hash": cfg.hash()})
    return [ShardState(storage.join(folder, e["name"]), shards.shard_id(e["name"]), int(e["samples"]))
            for e in entries]
