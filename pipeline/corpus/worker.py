"""CorpusWorker: one shard of images → one purified shard and its records, committed.

Samples stream through three stages on bounded queues, so decoded images of a whole shard
are never held at once and decoding / encoding run beside the purifier:

  decode thread : tar members as they arrive → image decoded → size policy → item
  caller thread : items grouped by shape (engine.Batcher) → purifier → batch of outcomes
  encode thread : restore size → encode in the input's format → PSNR / SSIM → record row,
                  members written in input order to the output shard

Then, only if the whole archive read cleanly: the output shard is put atomically under its
input's name, and the records are committed with the results protocol (per-attempt Parquet
file, marker last). A shard that fails writes nothing and is retried or quarantined by the driver.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline import schema
from pipeline.config import Config
from pipeline.corpus import EXAMPLE_KEYS, STAGE, images
from pipeline.corpus.engine import Batcher, Engine, Outcome, check_resize
from pipeline.corpus.reader import RawSample, ShardReader
from pipeline.corpus.writer import TarSink
from pipeline.io import shards, storage
from pipeline.run import commit, faults, host
from pipeline.run.worker_base import WorkerBase
from pipeline.schema import CorpusStatus

log = logging.getLogger(__name__)

QUEUE_ITEMS = 32          # decoded items waiting for the purifier
QUEUE_BATCHES = 1         # purified batches waiting for the encoder
WINDOW_BATCHES = 4        # an item waits at most this many batches' worth of samples for its shape's batch
PENDING_BYTES = 128 * 2**20   # decoded images waiting in the batcher for batch-mates
ENCODING_PER_THREAD = 4   # samples handed to each encoder thread and not yet encoded
JOIN_TIMEOUT_S = 30.0     # a reader stuck in a network read after a failure is left behind (daemon)


@dataclass
class Item:
    seq: int
    raw: RawSample
    status: str | None = None
    error: str | None = None
    image_index: int | None = None
    decoded: images.Decoded | None = None
    x: torch.Tensor | None = None            # what the purifier sees, [C, h, w] in [0, 1]
    purify_hw: tuple[int, int] | None = None
    outcome: Outcome | None = None
    decode_s: float = 0.0


class _Aborted(Exception):
    """Another stage of the pipeline failed; this one stops."""


_END = object()


class _Channel:
    """A bounded queue between two stages that gives up as soon as any stage failed."""

    def __init__(self, size: int, failed: threading.Event):
        self._q: queue.Queue = queue.Queue(size)
        self._failed = failed

    def put(self, obj: Any) -> None:
        while True:
            if self._failed.is_set():
                raise _Aborted
            try:
                self._q.put(obj, timeout=0.2)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self._failed.is_set():
                raise _Aborted
            try:
                return self._q.get(timeout=0.2)
            except queue.Empty:
                continue


class CorpusWorker(WorkerBase):
    """The corpus job's worker (WorkerBase: config, process set-up with the host memory
    policy, ready info); an actor holds one (`actor_host`)."""

    def __init__(self, cfg_dict: dict[str, Any], cpus: float = 1.0):
        super().__init__(cfg_dict, cpus)
        if self.cfg.corpus is None:
            raise ValueError("CorpusWorker needs a corpus job config (a `corpus:` section)")
        n = max(1, int(cpus))
        self.encode_threads = max(1, n - self.compute_threads(cpus))
        # one pool for the worker's life: threads (and their malloc arenas) are not renewed per shard
        self.encoders = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="encode")
        self.engine = Engine(self.cfg)
        self.device = self.engine.device
        c = self.cfg.corpus
        self.policy = images.SizePolicy(c.resize, c.crop, c.restore_size, c.interpolation)
        if c.metrics:  # scikit-image imports in seconds: not inside the first sample's timing
            import skimage.metrics  # noqa: F401

    def compute_threads(self, cpus: float) -> int:
        # the CPUs are shared with the decode thread and the encoders: torch's intra-op threads
        # spin at their barriers, and oversubscribed they slow the purifier several-fold
        return max(1, max(1, int(cpus)) // 2)

    def describe(self) -> dict[str, Any]:
        return {"flags": self.engine.defense.purifier.flags(), "channels": self.engine.channels}

    def data_check(self, cfg: Config, url: str) -> None:
        check_resize(cfg)   # a corpus.resize the purifier's networks cannot take

    def process(self, url: str, sid: str, stage: str = STAGE, expected: int | None = None) -> dict[str, Any]:
        """One input shard → output shard `<sid>.tar` → records → commit marker."""
        t0 = time.time()
        faults.inject(self.cfg.faults, sid)
        run = ShardRun(self, url, sid, stage)
        try:
            run.execute()
            if expected is not None and run.reader.samples != expected:
                raise shards.ShardError(f"{url}: holds {run.reader.samples} samples, the index says {expected}")
            data = run.sink.finish()
        except BaseException:
            run.sink.discard()
            host.release_freed_memory()
            raise
        name = f"{sid}.tar"
        storage.put_bytes(storage.join(self.cfg.job.output, name), data)  # atomic: whole or absent
        entry = shards.index_entry(name, run.sink.samples, data)
        counts: dict[str, int] = {}
        examples: dict[str, dict[str, Any]] = {}   # per reason: the first keys and the first error
        for r in run.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            if r["status"] != CorpusStatus.OK.value:
                ex = examples.setdefault(r["status"], {"keys": [], "error": r.get("error")})
                if len(ex["keys"]) < EXAMPLE_KEYS:
                    ex["keys"].append(r["key"])
        marker = commit.commit_records(self.cfg.job.output, stage, sid, run.rows, {
            "source": url, "samples": len(run.rows), "config_hash": self.cfg.hash(),
            "seconds": time.time() - t0, **self.placement(), "outputs": [entry],
            "ok": counts.get(CorpusStatus.OK.value, 0),
            "dropped": {k: v for k, v in sorted(counts.items()) if k != CorpusStatus.OK.value},
            "dropped_examples": dict(sorted(examples.items())),
            "input_bytes": run.reader.bytes_read, "non_file_members": run.reader.non_file_members,
            "max_rows": self.engine.rows_choice.record() if self.engine.rows_choice is not None else None,
        }, table_schema=schema.CORPUS_SCHEMA)
        del run, data
        host.release_freed_memory()
        return marker


class ShardRun:
    """One shard through decode → batch → purify → encode → write (see the module doc)."""

    def __init__(self, worker: CorpusWorker, url: str, sid: str, stage: str):
        self.w, self.url, self.sid = worker, url, sid
        self.corpus = worker.cfg.corpus
        self.reader = ShardReader(url)
        self.sink = TarSink()
        self.rows: list[dict[str, Any]] = []
        # the purifier's view stays the reference for PSNR / SSIM only when it is not the input
        policy = worker.policy
        self._needs_x = bool(self.corpus.metrics and policy.size is not None and not policy.restore)
        e = worker.engine
        self.common = {**e.provenance, "schema_version": schema.CORPUS_SCHEMA_VERSION, "job": worker.cfg.job.name,
                       "config_hash": worker.cfg.hash(), "stage": stage, "shard": sid, "node_id": host.node_id(),
                       "host": socket.gethostname(), "device": str(e.device)}

    def execute(self) -> None:
        failed = threading.Event()
        errors: list[BaseException] = []
        decoded, purified = _Channel(QUEUE_ITEMS, failed), _Channel(QUEUE_BATCHES, failed)

        def guard(fn: Callable[..., None], *args: Any) -> None:
            try:
                fn(*args)
            except _Aborted:
                pass
            except BaseException as err:  # the first failure is the shard's; the others stop
                errors.append(err)
                failed.set()

        threads = [threading.Thread(target=guard, args=(self._decode_all, decoded), daemon=True,
                                    name=f"decode-{self.sid}"),
                   threading.Thread(target=guard, args=(self._encode_all, purified), daemon=True,
                                    name=f"encode-{self.sid}")]
        for t in threads:
            t.start()
        guard(self._purify_all, decoded, purified)
        for t in threads:
            t.join(JOIN_TIMEOUT_S if failed.is_set() else None)
        if errors:
            raise errors[0]

    # -- decode ---------------------------------------------------------------------------

    def _decode_all(self, out: _Channel) -> None:
        for seq, raw in enumerate(self.reader):
            out.put(self._prepare(seq, raw))
        out.put(_END)  # only after the reader validated the end of the archive

    def _prepare(self, seq: int, raw: RawSample) -> Item:
        item = Item(seq, raw, raw.status, raw.error)
        if item.status is not None:
            return item
        t0 = time.perf_counter()
        try:
            item.image_index = images.pick_image([ext for ext, _ in raw.members])
            d = images.decode(raw.members[item.image_index][1], self.corpus.max_pixels)
            x = torch.from_numpy(d.unit()).permute(2, 0, 1)
            item.decoded, item.x = d, self.w.policy.to_purifier(x).contiguous()
            item.purify_hw = (item.x.shape[1], item.x.shape[2])
        except images.ImageError as err:
            item.status, item.error = err.status.value, str(err)
        item.decode_s = time.perf_counter() - t0
        return item

    # -- purify ---------------------------------------------------------------------------

    def _purify_all(self, inp: _Channel, out: _Channel) -> None:
        bs = self.w.cfg.data.batch_size
        batcher = Batcher(bs, self.corpus.max_batch_pixels, WINDOW_BATCHES * bs, PENDING_BYTES)
        while (item := inp.get()) is not _END:
            if item.status is not None:
                out.put([item])
                continue
            nbytes = item.decoded.pixels.nbytes + item.x.numel() * 4
            pixels = item.x.shape[1] * item.x.shape[2]
            for batch in batcher.add(item, item.seq, tuple(item.x.shape), pixels, nbytes):
                out.put(self._purify(batch))
        for batch in batcher.drain():
            out.put(self._purify(batch))
        out.put(_END)

    def _purify(self, batch: list[Item]) -> list[Item]:
        for item, outcome in zip(batch, self.w.engine.run([i.x for i in batch], [i.raw.key for i in batch])):
            item.outcome = outcome
            if not self._needs_x:  # the quality reference is the input itself: free the copy
                item.x = None
            if outcome.error is not None:
                item.status, item.error = CorpusStatus.PURIFY_ERROR.value, outcome.error
        return batch

    # -- encode and write -----------------------------------------------------------------

    def _encode_all(self, inp: _Channel) -> None:
        """Encode on a small thread pool (Pillow and numpy release the GIL), write in input order."""
        pending: dict[int, Future] = {}
        next_seq = 0
        limit = ENCODING_PER_THREAD * self.w.encode_threads
        while (batch := inp.get()) is not _END:
            for item in batch:
                pending[item.seq] = self.w.encoders.submit(self._finish, item)
            while len(busy := [f for f in pending.values() if not f.done()]) > limit:
                wait(busy, return_when=FIRST_COMPLETED)  # bounds decoded images queued for encoding
            next_seq = self._write(pending, next_seq, wait=False)
        next_seq = self._write(pending, next_seq, wait=True)
        if pending:
            raise RuntimeError(f"{self.url}: internal error: samples {sorted(pending)[:5]} never reached the writer")

    def _write(self, pending: dict[int, Future], next_seq: int, wait: bool) -> int:
        """Write the finished samples that are next in input order (with `wait`: every one
        already handed to the encoders, waiting for each)."""
        while next_seq in pending and (wait or pending[next_seq].done()):
            row, members, key = pending.pop(next_seq).result()
            self.rows.append(row)
            if members is not None:
                self.sink.add(key, members)
            next_seq += 1
        return next_seq

    def _finish(self, item: Item) -> tuple[dict[str, Any], list | None, str]:
        """(record row, output members or None, key) of one sample."""
        row = self._row(item)
        if item.status is not None:
            row.update(status=item.status, error=item.error, seconds=item.decode_s)
            return row, None, item.raw.key
        t0 = time.perf_counter()
        try:
            data, figures = self._encode(item)
        except Exception as err:  # an image Pillow cannot write back: this sample's error
            row.update(status=CorpusStatus.ENCODE_ERROR.value, error=f"{type(err).__name__}: {err}")
            return row, None, item.raw.key
        encode_s = time.perf_counter() - t0
        members = [(ext, data if i == item.image_index else b) for i, (ext, b) in enumerate(item.raw.members)]
        o = item.outcome
        row.update(figures, status=CorpusStatus.OK.value, error=o.classifier_error, output_bytes=len(data),
                   purify_nfe=o.nfe, pred_before=o.pred_before, preds_after=o.preds_after, vote_after=o.vote_after,
                   purify_seconds=o.seconds, encode_seconds=encode_s, seconds=item.decode_s + o.seconds + encode_s)
        return row, members, item.raw.key

    def _encode(self, item: Item) -> tuple[bytes, dict[str, Any]]:
        d, policy, c = item.decoded, self.w.policy, self.corpus
        y = policy.to_output(item.outcome.image, d.size)
        out_hw = (y.shape[1], y.shape[2])
        alpha = images.alpha_for_output(d.alpha, policy, out_hw) if d.alpha is not None else None
        data, mode = images.encode(y.permute(1, 2, 0).numpy(), alpha, d, c.jpeg_quality)
        figures: dict[str, Any] = {"output_format": d.format, "output_mode": mode,
                                   "output_height": out_hw[0], "output_width": out_hw[1]}
        if c.metrics:
            # against what the output stands for: the input, or the purifier's view of it when not restored
            ref = item.x.permute(1, 2, 0).numpy() if self._needs_x else d.unit()
            back = images.decode(data, max(c.max_pixels, out_hw[0] * out_hw[1])).unit()
            figures["psnr"], figures["ssim"] = images.psnr_ssim(ref, back)
        return data, figures

    def _row(self, item: Item) -> dict[str, Any]:
        raw, d = item.raw, item.decoded
        row: dict[str, Any] = {**self.common, "key": raw.key, "label": _label(raw), "decode_seconds": item.decode_s}
        if item.image_index is not None:
            ext, data = raw.members[item.image_index]
            row.update(image_field=ext, input_bytes=len(data))
        if d is not None:
            row.update(input_format=d.format, input_mode=d.mode, input_bits=d.bits,
                       input_height=d.size[0], input_width=d.size[1],
                       purify_height=item.purify_hw[0], purify_width=item.purify_hw[1])
        return row


def _label(raw: RawSample) -> int | None:
    """The class from a .cls member, when there is one that holds an integer."""
    for ext, data in raw.members:
        if ext.lower() == "cls":
            try:
                return int(data.decode().strip())
            except ValueError:
                return None
    return None
