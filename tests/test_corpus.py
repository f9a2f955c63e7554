"""The corpus job's worker in-process (no Ray): the bad-input matrix, shard-level failures,
streaming, batching, size policy, channels, keyed noise, records."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.corpus import images, job, synth
from pipeline.corpus.engine import Batcher, check_resize
from pipeline.corpus.reader import ShardReader
from pipeline.corpus.worker import STAGE, CorpusWorker
from pipeline.io import checkpoints
from pipeline.io.shards import ShardError
from pipeline.purifiers.nets.small_dae import SmallDAE
from pipeline.run import commit

RNG = np.random.default_rng(0)
RGB = synth.smooth_image(RNG, 24, 32)


def _worker(tmp_path, pattern: str = "unused.tar", purifier: str = "none", params: dict | None = None,
            classifier: str | None = None, classifier_params: dict | None = None, **corpus) -> CorpusWorker:
    cfg = job.build_config(pattern, str(tmp_path / "out"), purifier=purifier, params=params,
                           classifier=classifier, classifier_params=classifier_params, corpus=corpus,
                           overrides=["data.batch_size=4"])
    return CorpusWorker(cfg.to_dict())


def _shard(tmp_path, members, name="in-000000.tar") -> str:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(synth.tar_bytes(members))
    return str(path)


def _tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _rows(tmp_path, sid="in-000000") -> dict[str, dict]:
    table = commit.read_committed(str(tmp_path / "out"), STAGE, sid)
    assert table.schema.equals(schema.CORPUS_SCHEMA)
    rows = table.to_pylist()
    return {r["key"] if r["status"] != "duplicate_key" else r["key"] + "#2": r for r in rows}


def _png(arr, **kw) -> bytes:
    return synth.encode(arr, "PNG", **kw)


def _matrix_members() -> list[tuple[str, bytes]]:
    big = np.broadcast_to(np.linspace(0, 255, 4000, dtype=np.float32)[None, :, None], (3000, 4000, 3)).astype(np.uint8)
    grey16 = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 97 % 65536).astype(np.uint16)
    rgba = np.concatenate([RGB, (np.arange(24 * 32) % 256).reshape(24, 32, 1).astype(np.uint8)], 2)
    jpg = synth.encode(RGB, "JPEG")
    m = synth.sample_members("good", jpg, "jpg", caption="a cat", label=3, meta={"url": "http://x/1.jpg"})
    m += [("undecodable.jpg", b"these bytes are no image at all"), ("undecodable.txt", b"c")]
    m += [("cutjpeg.jpg", jpg[: len(jpg) // 2])]
    m += [("zerobyte.png", b""), ("zerobyte.json", b"{}")]
    m += [("noimage.txt", b"only a caption"), ("noimage.json", b"{}")]
    m += synth.sample_members("tiny", _png(RGB[:1, :1]), "png")
    m += synth.sample_members("huge", synth.encode(big, "JPEG"), "jpg")
    m += synth.sample_members("cmyk", synth.encode(RGB, "JPEG", mode="CMYK"), "jpg")
    m += synth.sample_members("grey16", _png(grey16[..., None]), "png")
    m += synth.sample_members("rgb16", synth.png16_colour(RGB.astype(np.uint16) * 257), "png")
    m += synth.sample_members("palette", _png(RGB, mode="P", transparency=0), "png")
    m += synth.sample_members("rgba", _png(rgba), "png")
    m += synth.sample_members("grey", synth.encode(RGB[..., :1], "JPEG"), "jpeg")
    m += synth.sample_members("lossless", synth.encode(RGB, "WEBP", lossless=True), "webp")
    m += [("twoimages.jpg", jpg), ("twoimages.png", _png(RGB))]
    frames = [Image.fromarray(RGB[..., ::-1] if i % 2 else RGB) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    m += synth.sample_members("animated", buf.getvalue(), "webp")
    m += [("README", b"not a sample")]
    m += synth.sample_members("good", jpg, "jpg")          # the key again, not adjacent
    return m


EXPECTED = {
    "good": ("ok", None), "undecodable": ("decode_error", "cannot identify image"),
    "cutjpeg": ("decode_error", "Truncated"), "zerobyte": ("decode_error", "empty image member"),
    "noimage": ("no_image", "no image member"), "tiny": ("ok", None), "huge": ("ok", None),
    "cmyk": ("ok", None), "grey16": ("ok", None), "rgb16": ("unsupported_image", "16-bit RGB PNG"),
    "palette": ("ok", None), "rgba": ("ok", None), "grey": ("ok", None), "lossless": ("ok", None),
    "twoimages": ("multiple_images", "jpg, png"),
    "animated": ("unsupported_image", "animated WEBP (3 frames)"),
    "README": ("bad_member", "not named <key>.<extension>"),
    "good#2": ("duplicate_key", "appears again"),
}


@pytest.mark.timeout(120)
def test_bad_input_matrix_becomes_named_rows_and_the_rest_completes(tmp_path):
    members = _matrix_members()
    url = _shard(tmp_path, members)
    marker = _worker(tmp_path).process(url, "in-000000", STAGE)
    rows = _rows(tmp_path)
    assert {k: r["status"] for k, r in rows.items()} == {k: v[0] for k, v in EXPECTED.items()}
    for k, (_, text) in EXPECTED.items():
        if text:
            assert text in rows[k]["error"], (k, rows[k]["error"])
    ok = [k for k, (s, _) in EXPECTED.items() if s == "ok"]
    assert marker["ok"] == len(ok) and marker["samples"] == len(EXPECTED)
    assert marker["dropped"] == {"bad_member": 1, "decode_error": 3, "duplicate_key": 1, "multiple_images": 1,
                                 "no_image": 1, "unsupported_image": 2}
    # the output holds exactly the ok samples, in input order, with every member under its name
    out = _tar_members(tmp_path / "out" / "in-000000.tar")
    expected = [(n, d) for n, d in members[:-2] if n.split(".")[0] in ok]   # [-2:]: the duplicate "good"
    assert [n for n, _ in out] == [n for n, _ in expected]
    for (name, data), (_, orig) in zip(out, expected):
        if name.rsplit(".", 1)[-1] in ("txt", "json", "cls"):
            assert data == orig, name                       # carried over unchanged
    assert marker["outputs"][0]["samples"] == len(ok)
    _check_matrix_images(dict(out), rows)


def _check_matrix_images(out: dict[str, bytes], rows: dict[str, dict]) -> None:
    def im(name):
        return Image.open(io.BytesIO(out[name]))

    assert im("huge.jpg").size == (4000, 3000) and rows["huge"]["psnr"] > 35
    assert im("tiny.png").size == (1, 1) and rows["tiny"]["ssim"] is None and rows["tiny"]["psnr"] == float("inf")
    assert im("cmyk.jpg").mode == "CMYK" and rows["cmyk"]["output_mode"] == "CMYK"
    g16 = im("grey16.png")
    assert g16.mode.startswith("I;16") and rows["grey16"]["input_bits"] == 16
    assert rows["grey16"]["psnr"] == float("inf")            # 16-bit PNG in, the same 16 bits out
    assert im("palette.png").mode == "RGBA" and rows["palette"]["input_mode"] == "P"
    rgba_in = np.asarray(Image.open(io.BytesIO(_png(np.concatenate(
        [RGB, (np.arange(24 * 32) % 256).reshape(24, 32, 1).astype(np.uint8)], 2)))))
    assert np.array_equal(np.asarray(im("rgba.png")), rgba_in)  # `none` + PNG: lossless, alpha kept
    assert im("grey.jpeg").mode == "L"
    assert rows["lossless"]["psnr"] == float("inf") and rows["lossless"]["output_format"] == "WEBP"
    assert rows["good"]["label"] == 3 and 30 < rows["good"]["psnr"] < float("inf")
    assert rows["good"]["input_width"] == rows["good"]["output_width"] == 32


def test_too_large_image_is_never_decoded(tmp_path):
    url = _shard(tmp_path, synth.sample_members("a", _png(RGB), "png") + synth.sample_members(
        "b", synth.encode(np.zeros((200, 100, 3), np.uint8), "JPEG"), "jpg"))
    _worker(tmp_path, max_pixels=10_000).process(url, "in-000000", STAGE)
    rows = _rows(tmp_path)
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"] == "too_large" and "20000 pixels" in rows["b"]["error"]


# ---------------------------------------------------------------------------- shard level

def _good_members(n: int = 6) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in synth.sample_members(f"k{i}", synth.encode(RGB, "JPEG"), "jpg", caption="c")]


def _end_of_members(data: bytes) -> int:
    """Offset just past the last member's data: where the end-of-archive blocks start."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + ((last.size + 511) // 512) * 512


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "one_zero_block", "zero_bytes", "broken_header"])
def test_damaged_shard_writes_nothing_and_names_the_reason(tmp_path, cut):
    data = synth.tar_bytes(_good_members())
    end = _end_of_members(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    damaged = {"mid_member": data[: len(data) // 2], "member_boundary": data[:end],
               "one_zero_block": data[: end + 512], "zero_bytes": b"",
               "broken_header": data[:last.offset] + b"\x01" * 512 + data[last.offset + 512:]}[cut]
    path = tmp_path / "in" / "in-000000.tar"
    path.parent.mkdir()
    path.write_bytes(damaged)
    with pytest.raises(ShardError, match="truncated|empty file|corrupt") as err:
        _worker(tmp_path).process(str(path), "in-000000", STAGE)
    assert str(path) in str(err.value)
    assert not (tmp_path / "out" / "in-000000.tar").exists()
    assert commit.committed(str(tmp_path / "out"), STAGE) == {}


def test_empty_shard_commits_an_empty_output(tmp_path):
    url = _shard(tmp_path, [])
    marker = _worker(tmp_path).process(url, "in-000000", STAGE, expected=0)
    assert marker["rows"] == 0 and marker["samples"] == 0 and marker["outputs"][0]["samples"] == 0
    assert _tar_members(tmp_path / "out" / "in-000000.tar") == []


def test_sample_count_must_match_the_index(tmp_path):
    url = _shard(tmp_path, _good_members(3))
    with pytest.raises(ShardError, match="holds 3 samples, the index says 4"):
        _worker(tmp_path).process(url, "in-000000", STAGE, expected=4)
    assert not (tmp_path / "out" / "in-000000.tar").exists()


def test_reader_streams_members_as_they_arrive(tmp_path):
    """The first sample is handed out after reading a small part of a large shard."""
    big = RNG.integers(0, 255, 256 * 1024, dtype=np.uint8).tobytes()   # incompressible payloads
    members = [(f"k{i:03d}.bin", big) for i in range(40)]                 # 10 MiB shard
    reader = ShardReader(_shard(tmp_path, members))
    it = iter(reader)
    first = next(it)
    assert first.key == "k000" and first.members == [("bin", big)]
    assert reader.bytes_read < 1024 * 1024                               # < 10% of the shard
    assert sum(1 for _ in it) == 39 and reader.bytes_read >= 40 * len(big)


# ---------------------------------------------------------------------------- batching

def test_batcher_groups_shapes_and_bounds_what_it_holds():
    b = Batcher(batch_size=2, max_batch_pixels=10**9, window=4, max_pending_bytes=10**9)
    assert b.add("a0", 0, (3, 8, 8), 64, 1) == []
    assert b.add("b0", 1, (3, 4, 4), 16, 1) == []
    assert b.add("a1", 2, (3, 8, 8), 64, 1) == [["a0", "a1"]]       # full
    assert b.add("c0", 3, (3, 2, 2), 4, 1) == []
    assert b.add("c1", 4, (3, 2, 2), 4, 1) == [["c0", "c1"]]
    assert b.add("d0", 5, (3, 6, 6), 36, 1) == [["b0"]]              # b0 is 4 items behind: released
    assert b.drain() == [["d0"]]
    small = Batcher(batch_size=8, max_batch_pixels=100, window=100, max_pending_bytes=10)
    assert small.add("x", 0, (1, 8, 8), 64, 4) == []
    assert small.add("y", 1, (1, 8, 8), 64, 4) == [["x", "y"]]       # pixel cap
    assert small.add("p", 2, (1, 2, 2), 4, 8) == []
    assert small.add("q", 3, (1, 3, 3), 9, 8) == [["p"]]             # byte cap: oldest group first


def test_output_order_is_input_order_with_mixed_shapes(tmp_path):
    shapes = [(8, 8), (12, 16), (8, 8), (5, 7), (8, 8), (12, 16), (8, 8), (8, 8), (9, 9), (8, 8)]
    members = []
    for i, (h, w) in enumerate(shapes):
        members += synth.sample_members(f"s{i}", _png(synth.smooth_image(RNG, h, w)), "png")
    url = _shard(tmp_path, members)
    _worker(tmp_path).process(url, "in-000000", STAGE)
    assert [n for n, _ in _tar_members(tmp_path / "out" / "in-000000.tar")] == [n for n, _ in members]


# ---------------------------------------------------------------------------- size policy

def test_size_policy_resize_restore_and_crop():
    x = torch.rand(3, 30, 40)
    stretch = images.SizePolicy(16, restore=True)
    y = stretch.to_purifier(x)
    assert y.shape == (3, 16, 16) and stretch.to_output(y, (30, 40)).shape == (3, 30, 40)
    crop = images.SizePolicy(16, crop=True)
    c = crop.to_purifier(x)
    assert c.shape == (3, 16, 16) and crop.to_output(c, (30, 40)).shape == (3, 16, 16)
    # a left-to-right ramp: the centre crop keeps its middle, the stretch keeps all of it
    ramp = torch.linspace(0, 1, 40).expand(1, 30, 40)
    centre, whole = crop.to_purifier(ramp), stretch.to_purifier(ramp)
    assert centre.min() > 0.05 and centre.max() < 0.95
    assert whole.min() < 0.05 and whole.max() > 0.95
    assert images.SizePolicy(None).to_purifier(x) is x
    with pytest.raises(ConfigError, match="corpus.restore_size"):
        job.build_config("x.tar", "out", purifier="none", corpus={"resize": 8, "crop": True, "restore_size": True})


def test_resize_restore_writes_the_input_size_and_measures_against_the_input(tmp_path):
    url = _shard(tmp_path, synth.sample_members("a", synth.encode(RGB, "JPEG", quality=95), "jpg"))
    _worker(tmp_path, resize=16, restore_size=True).process(url, "in-000000", STAGE)
    r = _rows(tmp_path)["a"]
    assert (r["purify_width"], r["purify_height"]) == (16, 16)
    assert (r["output_width"], r["output_height"]) == (32, 24) == (r["input_width"], r["input_height"])
    assert 15 < r["psnr"] < 40 and 0 < r["ssim"] < 1     # a 16-px bottleneck loses detail
    out = dict(_tar_members(tmp_path / "out" / "in-000000.tar"))
    assert Image.open(io.BytesIO(out["a.jpg"])).size == (32, 24)


# ---------------------------------------------------------------------------- purifiers

def _dae(tmp_path, channels: int, meta: dict | None = None) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / f"dae{channels}.pt")
    checkpoints.save(path, "small_dae", {"in_channels": channels, "width": 4},
                     SmallDAE(in_channels=channels, width=4).state_dict(), meta)
    return path


def test_channels_adapt_and_a_failing_sample_spares_its_batch(tmp_path):
    members = synth.sample_members("rgb", _png(synth.smooth_image(RNG, 8, 8)), "png")
    members += synth.sample_members("grey", _png(synth.smooth_image(RNG, 8, 8, 1)), "png")
    members += synth.sample_members("one", _png(RGB[:1, :1]), "png")       # 1×1: the DAE needs H, W ÷ 4
    url = _shard(tmp_path, members)
    w = _worker(tmp_path, purifier="dae", params={"checkpoint": _dae(tmp_path, 1)})
    assert w.engine.channels == 1
    w.process(url, "in-000000", STAGE)
    rows = _rows(tmp_path)
    assert rows["rgb"]["status"] == rows["grey"]["status"] == "ok"
    assert rows["rgb"]["output_mode"] == "RGB" and rows["grey"]["output_mode"] == "L"
    assert rows["one"]["status"] == "purify_error" and "Error" in rows["one"]["error"]
    assert rows["rgb"]["psnr"] < 40                                         # an untrained DAE changes the image


def test_a_size_the_purifier_cannot_take_names_the_constraint_and_the_resize(tmp_path):
    members = synth.sample_members("fits", _png(synth.smooth_image(RNG, 8, 12, 1)), "png")
    members += synth.sample_members("odd", _png(synth.smooth_image(RNG, 30, 30, 1)), "png")
    url = _shard(tmp_path, members)
    ckpt = _dae(tmp_path, 1, {checkpoints.INPUT_SHAPE: [1, 8, 8]})
    _worker(tmp_path, purifier="dae", params={"checkpoint": ckpt}).process(url, "in-000000", STAGE)
    rows = _rows(tmp_path)
    assert rows["fits"]["status"] == "ok" and rows["odd"]["status"] == "purify_error"
    assert rows["odd"]["error"] == (
        "InputSizeError: small_dae needs height and width divisible by 4 (it down-samples by 4 and up-samples "
        "back); this image is 30×30; purify at a size it takes: --resize N (corpus.resize) with N divisible by 4, "
        "e.g. --resize 8, the size its checkpoint was trained on; add --restore-size to write the input's size back")
    w = _worker(tmp_path / "r", purifier="dae", params={"checkpoint": ckpt}, resize=30)
    w.process(url, "in-000000", STAGE)
    errors = {r["error"] for r in _rows(tmp_path / "r").values()}
    assert len(errors) == 1 and "this image is 30×30; corpus.resize 30 does not fit it; purify at" in errors.pop()


def test_a_resize_the_purifier_cannot_take_is_refused_before_work(tmp_path):
    url = _shard(tmp_path, _good_members(2))
    ckpt = _dae(tmp_path, 1, {checkpoints.INPUT_SHAPE: [1, 8, 8]})
    cfg = job.build_config(url, str(tmp_path / "out"), purifier="dae", params={"checkpoint": ckpt},
                           corpus={"resize": 30})
    with pytest.raises(ConfigError) as err:
        job.run(cfg)
    assert str(err.value) == (
        f"<advpure purify>: corpus.resize 30: the purifier's small_dae network (purifier.params.checkpoint: {ckpt}) "
        "needs height and width divisible by 4 (it down-samples by 4 and up-samples back); purify at a size it "
        "takes: --resize N (corpus.resize) with N divisible by 4, e.g. --resize 8, the size its checkpoint was "
        "trained on; add --restore-size to write the input's size back")
    # checked on the job's worker, under the job lease: nothing but the released lease is left
    assert [p.name for p in (tmp_path / "out").rglob("*") if not p.name.startswith(".lease")] == []
    check_resize(job.build_config(url, "o", purifier="dae", params={"checkpoint": ckpt}, corpus={"resize": 28}))


def test_the_corpus_worker_applies_the_host_memory_policy_and_says_where_it_runs(tmp_path, monkeypatch):
    from pipeline.run import host

    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append("keep freed memory") or True)
    monkeypatch.setattr(host.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    cfg = job.build_config("unused.tar", str(tmp_path / "out"), purifier="none")
    w = CorpusWorker(cfg.to_dict(), cpus=4)
    assert calls == [("threads", 2), "keep freed memory"] and w.encode_threads == 2   # half the CPUs encode
    info = w.ready()
    assert info["device"] == "cpu" and info["node_id"] is None, info   # no Ray in this process
    assert {"host", "pid", "gpu_ids", "flags", "channels"} <= set(info)


def test_the_corpus_workers_data_check_names_the_users_file(tmp_path):
    url = _shard(tmp_path, _good_members(2))
    ckpt = _dae(tmp_path, 1, {checkpoints.INPUT_SHAPE: [1, 8, 8]})
    w = _worker(tmp_path, purifier="dae", params={"checkpoint": ckpt}, resize=30)
    problem = w.check_data(url, "job.yaml")
    assert problem.startswith("job.yaml: corpus.resize 30: the purifier's small_dae network"), problem
    assert _worker(tmp_path, purifier="dae", params={"checkpoint": ckpt}, resize=8).check_data(url, "job.yaml") is None


def test_end_of_run_lines_name_the_dropped_keys_and_why(tmp_path):
    from pipeline.run import driver

    odd = _png(synth.smooth_image(RNG, 30, 30, 1))
    urls = [_shard(tmp_path, [m for i in range(4) for m in synth.sample_members(f"a{i}", odd, "png")]
                   + [("broken.png", b"no image")], "in-000000.tar"),
            _shard(tmp_path, [m for i in range(3) for m in synth.sample_members(f"b{i}", odd, "png")], "in-000001.tar")]
    w = _worker(tmp_path, purifier="dae", params={"checkpoint": _dae(tmp_path, 1)})
    markers = {sid: w.process(url, sid, STAGE) for url, sid in zip(urls, ("in-000000", "in-000001"))}
    assert markers["in-000000"]["dropped_examples"]["purify_error"]["keys"] == ["a0", "a1", "a2", "a3"]
    result = driver.StageResult(STAGE, {sid: driver.ShardState(u, sid, None) for u, sid in zip(urls, markers)}, 1.0)
    lines = job.format_outcome({"stages": {}, "corpus": job.corpus_summary(w.cfg, result, markers)}).splitlines()
    assert lines[2].startswith("dropped: decode_error 1, purify_error 7  (why, per sample: the records under ")
    assert lines[3].startswith("  decode_error 1: broken — broken: UnidentifiedImageError: ")
    assert lines[4].startswith("  purify_error 7: a0, a1, a2, a3, b0 and 2 more — a0: InputSizeError: small_dae needs")


def test_keyed_noise_output_does_not_depend_on_the_batch(tmp_path):
    from pipeline.purifiers.nets.score_nets import SmallScoreNet

    torch.manual_seed(0)
    ckpt = str(tmp_path / "score.pt")
    checkpoints.save(ckpt, "small_score", {"in_channels": 3, "width": 4},
                     SmallScoreNet(in_channels=3, width=4).state_dict())
    members = [m for i in range(6) for m in synth.sample_members(f"k{i}", _png(synth.smooth_image(RNG, 8, 8)), "png")]
    url = _shard(tmp_path, members)
    outs = []
    for bs, sub in ((4, "a"), (1, "b")):
        cfg = job.build_config(url, str(tmp_path / sub), purifier="adp", params={"checkpoint": ckpt, "max_iter": 2},
                               overrides=[f"data.batch_size={bs}"])
        CorpusWorker(cfg.to_dict()).process(url, "in-000000", STAGE)
        outs.append(_tar_members(tmp_path / sub / "in-000000.tar"))
    assert [n for n, _ in outs[0]] == [n for n, _ in outs[1]]
    for (name, a), (_, b) in zip(*outs):
        if name.endswith(".png"):
            da, db = (np.asarray(Image.open(io.BytesIO(v)), np.int16) for v in (a, b))
            assert np.abs(da - db).max() <= 1, name                           # float batching only
            assert not np.array_equal(da, np.asarray(Image.open(io.BytesIO(dict(members)[name]))))


def test_optional_classifier_predicts_before_and_after(tmp_path, digits_models):
    from pipeline.io import datasets

    imgs, labels, _ = datasets.load_split("digits", "test")
    members = [m for i in range(12) for m in synth.sample_members(
        f"d{i}", _png(imgs[i]), "png", label=int(labels[i]))]
    url = _shard(tmp_path, members)
    w = _worker(tmp_path, purifier="dae", params={"checkpoint": digits_models["dae"]},
                classifier="small_cnn", classifier_params={"checkpoint": digits_models["cnn"]})
    w.process(url, "in-000000", STAGE)
    rows = list(_rows(tmp_path).values())
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert all(len(r["preds_after"]) == 1 and r["vote_after"] == r["preds_after"][0] for r in rows)
    assert sum(r["pred_before"] == r["label"] for r in rows) >= 9
    assert rows[0]["classifier"] == "small_cnn" and rows[0]["classifier_sha256"]


def test_records_load_through_the_results_protocol(tmp_path):
    url = _shard(tmp_path, _good_members(3))
    marker = _worker(tmp_path).process(url, "in-000000", STAGE)
    assert marker["schema_version"] == schema.CORPUS_SCHEMA_VERSION
    table = commit.load_records(str(tmp_path / "out"), STAGE)
    assert table.num_rows == 3 and table.schema.metadata[b"advpure.records"] == b"corpus"
    with pytest.raises(KeyError, match="not in the schema"):
        schema.to_table([{"key": "a", "linf": 0.1}], schema.CORPUS_SCHEMA)
    assert json.loads((tmp_path / "out" / STAGE / "in-000000.done.json").read_text())["rows"] == 3


@pytest.fixture
def http_dir(tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_shards_stream_over_http(http_dir):
    root, base = http_dir
    data = synth.tar_bytes(_good_members(4))
    (root / "web").mkdir()
    (root / "web" / "a.tar").write_bytes(data)
    (root / "web" / "cut.tar").write_bytes(data[: _end_of_members(data)])   # no end-of-archive blocks
    w = _worker(root)
    assert w.process(f"{base}/web/a.tar", "a", STAGE, expected=4)["ok"] == 4
    with pytest.raises(ShardError, match="cut.tar: truncated tar"):
        w.process(f"{base}/web/cut.tar", "cut", STAGE)
    assert [n for n, _ in _tar_members(root / "out" / "a.tar")] == [n for n, _ in _good_members(4)]


def test_indexes_yaml_and_command_line_make_the_config(tmp_path):
    url = _shard(tmp_path, _good_members(3))
    wids = tmp_path / "in" / "wids.json"
    wids.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                "shardlist": [{"url": "in-000000.tar", "nsamples": 3}]}))
    assert job.expected_counts([url], str(wids)) == {url: 3}
    (tmp_path / "in" / "index.json").write_text('{"format": "another-tool/2"}')
    assert job.expected_counts([url], None) == {url: None}         # not ours: counted while reading
    yml = tmp_path / "purify.yaml"
    yml.write_text("purifier: {name: dae, params: {checkpoint: x.pt}}\ndata: {batch_size: 7}\n"
                   "corpus: {jpeg_quality: 80, resize: 8}\njob: {name: mine, seed: 3}\n")
    cfg = job.build_config(url, str(tmp_path / "o"), config_path=str(yml), purifier="none", corpus={"resize": 16})
    assert cfg.purifier.name == "none" and cfg.purifier.params == {}   # the YAML's params were for dae
    assert (cfg.corpus.jpeg_quality, cfg.corpus.resize, cfg.data.batch_size) == (80, 16, 7)
    assert (cfg.job.name, cfg.job.seed, cfg.classifier) == ("mine", 3, None)
    same = job.build_config(url, str(tmp_path / "o"), config_path=str(yml), purifier="none",
                            corpus={"resize": 16, "max_batch_pixels": 1000})
    other = job.build_config(url, str(tmp_path / "o"), config_path=str(yml), purifier="none", corpus={"resize": 32})
    assert cfg.hash() == same.hash() != other.hash()                   # batching is not part of the results
    yml.write_text("purifier: {name: none}\n")
    assert job.build_config(url, "o", config_path=str(yml)).purifier.name == "none"   # named by the YAML
    with pytest.raises(ConfigError, match=r"no purifier: give --purifier NAME .*`--purifier none` re-encodes"):
        job.build_config(url, "o")
    yml.write_text("attacks: [{name: pgd}]\n")
    with pytest.raises(ConfigError, match="runs no attacks"):
        job.build_config(url, str(tmp_path / "o"), config_path=str(yml), purifier="none")
