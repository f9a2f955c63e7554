"""ShardWorker: one per GPU (or CPU slot). Builds its models once; turns one shard into one
committed result: read → stage → write images → commit records. It never decides what
runs next: the driver does.

The shard streams through three threads on bounded queues — decode (shards.ShardStream),
compute (this thread, the stage), encode (ImageWriter, the stages that write images) — so a worker's
memory follows its batch size, not its shard's size; records are still committed per shard.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import schema, stage_table
from pipeline.config import Config
from pipeline.evaluation import preflight
from pipeline.evaluation.protocol import Protocol, build_protocol
from pipeline.evaluation.stages import StageOutput, check_share
from pipeline.io import shards, storage
from pipeline.run import commit, faults, host
from pipeline.run.worker_base import WorkerBase, device_name

DECODE_QUEUE_CHUNKS = 2      # decoded batches waiting for compute (each of the protocol's batch size)
ENCODE_QUEUE_BATCHES = 2     # computed batches of images waiting for the encoder


def _mark_nonfinite(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose defended logits hold NaN or ±inf (a diverged purifier) is a per-sample
    error, not a result: its predictions would be argmax of garbage."""
    logits = row.get("purified_mean_logits")
    if logits is None or np.isfinite(np.asarray(logits, dtype=np.float64)).all():
        return row
    return {**row, "status": schema.Status.NONFINITE.value,
            "error": "non-finite purified logits (NaN or inf): the purifier or classifier diverged"}


def _total_nfe(rows: list[dict[str, Any]]) -> int:
    """Model evaluations a shard cost: Σ over rows of attack_nfe + purify_nfe (shown as
    evaluations/s by the driver's progress bar)."""
    return int(sum(int(r.get("attack_nfe") or 0) + int(r.get("purify_nfe") or 0) for r in rows))


def _rows_choice(p: Protocol) -> dict[str, Any] | None:
    """The chunk this worker's calls used and why (evaluation/row_chunks.py), for the marker."""
    return p.rows_choice.record() if p.rows_choice is not None else None


class ShardWorker(WorkerBase):
    """The evaluation job's worker (WorkerBase: config, process set-up, ready info), tested
    and run in-process as it is; an actor holds one (`actor_host`)."""

    def __init__(self, cfg_dict: dict[str, Any], cpus: float = 1.0, stages: Sequence[stage_table.Stage] = ()):
        stage_table.adopt(stages)   # the job's stages registered outside the table (stage_table.added)
        super().__init__(cfg_dict, cpus)
        self.protocol = build_protocol(self.cfg)
        self.device = self.protocol.device
        self._next: tuple[str, int | None, shards.ShardStream] | None = None  # the prefetched shard
        # each shard's position in the job's order: its share of evaluation.check_samples
        self._order = {u: i for i, u in enumerate(shards.expand(self.cfg.data.shards))}

    def describe(self) -> dict[str, Any]:
        p = self.protocol
        return {"flags": p.defense.purifier.flags(), "gradients": {a.index: a.gradient for a in p.attacks}}

    def data_check(self, cfg: Config, url: str) -> None:
        preflight.check(cfg, url)   # input size and labels against the models

    def process(self, url: str, sid: str, stage: str = "evaluate", expected: int | None = None,
                prefetch: tuple[str, int | None] | None = None) -> dict[str, Any]:
        """One shard → image shards (the stages that write images), then records, then the marker.
        The shard streams through: decoded in a background thread into a bounded queue
        (shards.ShardStream), computed here batch by batch, images encoded and spooled by
        another thread (ImageWriter). Nothing is written before the whole archive has been
        read and validated, so a truncated or corrupt shard commits nothing.

        `prefetch` = (url, expected) of the shard the driver means to send next: its stream
        opens now and decodes its first batches (at most the decode queue) while this shard
        computes, so the next call starts on decoded samples."""
        t0 = time.time()
        faults.inject(self.cfg.faults, sid)
        st = stage_table.get(stage)
        run = st.function()
        total = self.cfg.evaluation.check_samples   # a shard outside the job's list: a job of its own
        self.protocol.check_samples = (check_share(total, self._order[url], len(self._order))
                                       if url in self._order else total)
        source, prefetched = self._stream(url, expected)
        if prefetch is not None:
            self._next = (*prefetch, self._open(*prefetch))
        writer = ImageWriter(self._image_member(st, sid, url)) if st.images else None
        try:
            result = run(self.protocol, source, emit=writer.put) if writer else run(self.protocol, source)
            source.finish()  # the archive was read to its end blocks and counted: now it may commit
            built = writer.finish() if writer else {}
        except BaseException:
            source.close()
            if writer:
                writer.discard()
            host.release_freed_memory()
            raise
        outputs = [self._put_images(st, sid, name, built.get(name)) for name in result.images]
        marker = self._commit(stage, sid, url, source, result, outputs, t0, prefetched)
        del result, built
        host.release_freed_memory()  # kept within a shard (host.keep_freed_memory), handed back after it
        return marker

    def close(self) -> None:
        """Stop decoding a prefetched shard (the local executor's worker outlives no job; an
        actor's process simply ends)."""
        nxt, self._next = self._next, None
        if nxt is not None:
            nxt[2].close()

    def _open(self, url: str, expected: int | None) -> shards.ShardStream:
        return shards.ShardStream(url, expected, self.cfg.data.max_samples_per_shard,
                                  chunk=self.protocol.batch_size, depth=DECODE_QUEUE_CHUNKS)

    def _stream(self, url: str, expected: int | None) -> tuple[shards.ShardStream, bool]:
        """(the prefetched stream when it is this shard's, else a new one; prefetched?). A
        prefetched stream of another shard (the driver gave it to another worker) is closed."""
        nxt, self._next = self._next, None
        if nxt is not None:
            if nxt[:2] == (url, expected):
                return nxt[2], True
            nxt[2].close()
        return self._open(url, expected), False

    def _commit(self, stage: str, sid: str, url: str, source: shards.ShardStream, result: StageOutput,
                outputs: list[dict[str, Any]], t0: float, prefetched: bool) -> dict[str, Any]:
        where = self.placement()
        common = {**self.protocol.provenance, "schema_version": schema.SCHEMA_VERSION, "stage": stage, "shard": sid,
                  "node_id": where["node_id"], "host": where["host"], "device": device_name(self.device)}
        rows = [{**common, "key": s.key, "label": s.label, "status": schema.Status.DECODE_ERROR.value,
                 "error": s.error} for s in source.errors]
        rows += [_mark_nonfinite({**common, "status": schema.Status.OK.value, "error": None, **r})
                 for r in result.rows]   # a row may carry its own status (verdict recheck's nonfinite)
        return commit.commit_records(self.cfg.job.output, stage, sid, rows, {
            "source": url, "samples": source.samples, "config_hash": self.protocol.provenance["config_hash"],
            "seconds": time.time() - t0, **where, "checks": result.checks,
            "check_samples": result.check_samples,
            "outputs": outputs, "nfe": _total_nfe(result.rows), "prefetched": prefetched,
            "max_rows": _rows_choice(self.protocol)})

    def _image_member(self, stage: stage_table.Stage, sid: str, url: str) -> Callable[..., tuple]:
        """(sample, image, extra) → TarBuilder.add_sample arguments: the input's key, and a
        json member carrying the sample's lineage (the stage's lineage function)."""
        lineage, origin = stage.lineage(), stage_table.Origin(url, sid, self.protocol.provenance)

        def member(sample: shards.Sample, image: np.ndarray, extra: dict[str, Any]) -> tuple:
            meta = lineage(sample, extra, origin)
            return sample.key, image, sample.label, {"json": json.dumps(meta).encode()}
        return member

    def _put_images(self, stage: stage_table.Stage, sid: str, name: str,
                    builder: shards.TarBuilder | None) -> dict[str, Any]:
        """One image shard with the input's keys, put atomically (an output with no samples is
        still written, empty)."""
        assert stage.images is not None, stage.name
        builder = builder or shards.TarBuilder()
        file = stage.images.file_name(sid, name)
        n = len(builder)
        data = builder.finish()
        storage.put_bytes(storage.join(self.cfg.job.output, stage.images.folder, file), data)
        return shards.index_entry(file, n, data)


class ImageWriter:
    """Encodes a stage's images (PNG + exact .npy) into spooled tar builders on a background
    thread, fed through a bounded queue, so encoding overlaps compute and the shard's images
    are never all held in memory as arrays. `finish()` returns the builders by output name;
    the worker puts them only after the input shard validated."""

    def __init__(self, member: Callable[..., tuple], depth: int = ENCODE_QUEUE_BATCHES):
        self._member = member
        self._q: queue.Queue = queue.Queue(depth)
        self._builders: dict[str, shards.TarBuilder] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="encode-images")
        self._thread.start()

    def put(self, name: str, items: list) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing images failed: {self._error}") from self._error
        self._q.put((name, items))

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain: the compute thread learns of the failure at its next put
            name, items = job
            try:
                builder = self._builders.setdefault(name, shards.TarBuilder())
                for item in items:
                    builder.add_sample(*self._member(*item))
            except BaseException as err:
                self._error = err

    def finish(self) -> dict[str, shards.TarBuilder]:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            self.discard()
            raise RuntimeError(f"writing images failed: {self._error}") from self._error
        return self._builders

    def discard(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        for b in self._builders.values():
            b.discard()
        self._builders = {}
