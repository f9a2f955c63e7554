"""`advpure purify` end to end on Ray: quarantine, resume, exactly once, indexes, and the
output read back by WebDataset and by an img2dataset-style tar reader."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cli
from pipeline.corpus import synth
from pipeline.corpus.worker import STAGE
from pipeline.run import commit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RNG = np.random.default_rng(1)


def _members(first: int, n: int, bad: bool = False) -> list[tuple[str, bytes]]:
    out = []
    for i in range(first, first + n):
        img = synth.encode(synth.smooth_image(RNG, 20 + i % 3, 28), "JPEG")
        out += synth.sample_members(f"{i:06d}", img, "jpg", caption=f"caption {i}", label=i % 10,
                                    meta={"url": f"http://example.invalid/{i}.jpg", "width": 28})
    if bad:
        out += [("broken.jpg", b"no image here"), ("broken.txt", b"x"), ("textonly.txt", b"no image")]
    return out


def _corpus(tmp_path, truncated: bool = True) -> tuple[str, dict[str, list]]:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    shards = {"train-000000": _members(0, 6), "train-000001": _members(6, 5, bad=True),
              "train-000002": _members(11, 4)}
    for sid, members in shards.items():
        data = synth.tar_bytes(members)
        (d / f"{sid}.tar").write_bytes(data[: len(data) // 2] if truncated and sid == "train-000002" else data)
    return str(d / "train-{000000..000002}.tar"), shards


def _purify(*args: str) -> int:
    return cli.main(["purify", *args])


def _markers(out) -> dict[str, str]:
    return {sid: m["parquet"] for sid, m in commit.committed(str(out), STAGE).items()}


@pytest.fixture(scope="module")
def quarantine_story(ray_local, tmp_path_factory) -> SimpleNamespace:
    """One corpus purified three times (module scope: the Ray jobs are the slow part): a first
    run that quarantines the truncated shard, a rerun that resumes, and a run after the shard is
    repaired. The first run's output is copied before the later runs touch it."""
    tmp = tmp_path_factory.mktemp("story")
    pattern, shards = _corpus(tmp)
    out = tmp / "purified"
    args = [pattern, str(out), "--purifier", "none", "--workers", "2", "--set", "cluster.max_attempts=2",
            "--set", "cluster.shard_timeout_s=120"]
    story = SimpleNamespace(shards=shards, out=out, first_out=tmp / "after-first-run")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        story.first_rc = _purify(*args)
    story.first_text = text.getvalue()
    story.first_manifest = json.loads((out / "manifest.json").read_text())
    story.first_markers = _markers(out)
    shutil.copytree(out, story.first_out)
    story.rerun_rc = _purify(*args)
    story.rerun_markers = _markers(out)
    (tmp / "corpus" / "train-000002.tar").write_bytes(synth.tar_bytes(shards["train-000002"]))   # repaired
    story.repaired_rc = _purify(*args)
    story.repaired_markers = _markers(out)
    return story


def test_a_truncated_shard_is_quarantined_and_the_run_exits_3(quarantine_story):
    s = quarantine_story
    assert s.first_rc == 3
    assert "train-000002 QUARANTINED" in s.first_text
    assert s.first_manifest["corpus"]["quarantined"]["train-000002"].count("truncated") == 1
    assert not (s.first_out / "train-000002.tar").exists()


def test_the_end_of_run_lines_count_samples_and_name_each_dropped_one(quarantine_story):
    text = quarantine_story.first_text
    assert "purified 11 of 13 samples into 2 of 3 shards" in text
    assert "dropped: decode_error 1, no_image 1" in text
    assert "\n  decode_error 1: broken — broken: " in text and "\n  no_image 1: textonly — textonly: " in text


def test_the_manifest_counts_each_shards_samples_and_drops(quarantine_story):
    c = quarantine_story.first_manifest["corpus"]
    assert c["shards"]["train-000001"] == {"samples": 7, "ok": 5, "dropped": {"decode_error": 1, "no_image": 1},
                                           "output": "train-000001.tar", "empty": False, "non_file_members": 0}


def test_the_indexes_list_the_committed_shards_with_their_checksums(quarantine_story):
    _check_indexes(quarantine_story.first_out, {"train-000000.tar": 6, "train-000001.tar": 5})


def test_a_rerun_skips_the_committed_shards(quarantine_story):
    s = quarantine_story
    assert s.rerun_rc == 3                                       # the truncated shard is still there
    assert s.rerun_markers == s.first_markers


def test_a_repaired_shard_commits_and_the_committed_ones_are_kept(quarantine_story):
    s = quarantine_story
    assert s.repaired_rc == 0
    after, first = s.repaired_markers, s.first_markers
    assert {k: after[k] for k in first} == first and set(after) == set(s.shards)


def test_the_indexes_grow_by_the_repaired_shard(quarantine_story):
    _check_indexes(quarantine_story.out, {"train-000000.tar": 6, "train-000001.tar": 5, "train-000002.tar": 4})


def _check_indexes(out, counts: dict[str, int]) -> None:
    wids = json.loads((out / "wids-index.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
    assert {e["url"]: e["nsamples"] for e in wids["shardlist"]} == counts
    for e in wids["shardlist"]:
        data = (out / e["url"]).read_bytes()
        assert e["filesize"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    own = json.loads((out / "index.json").read_text())
    assert own["total_samples"] == sum(counts.values())


def _read_back(story: SimpleNamespace) -> tuple[list[str], dict[str, bytes]]:
    """The first run's two output tars, and the input members they hold (the bad ones left out)."""
    ok = {name: data for sid in ("train-000000", "train-000001") for name, data in story.shards[sid]
          if not name.startswith(("broken", "textonly"))}
    return [str(story.first_out / "train-000000.tar"), str(story.first_out / "train-000001.tar")], ok


def test_webdataset_reads_back_the_inputs_keys_fields_and_sizes(quarantine_story):
    """Only the image bytes changed: keys, captions, metadata, labels and sizes are the input's."""
    import webdataset as wds

    urls, ok = _read_back(quarantine_story)
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        k = s["__key__"]
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "json", "cls"}
        assert s["txt"] == ok[f"{k}.txt"].decode() and s["json"] == json.loads(ok[f"{k}.json"])
        assert s["cls"] == int(ok[f"{k}.cls"])
        assert s["jpg"].size == Image.open(io.BytesIO(ok[f"{k}.jpg"])).size
        seen += 1
    assert seen == 11


def test_undecoded_images_are_new_jpeg_bytes(quarantine_story):
    import webdataset as wds

    urls, ok = _read_back(quarantine_story)
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG" and s["jpg"] != ok[f"{s['__key__']}.jpg"]


def test_webdataset_tuples_decode_to_rgb(quarantine_story):
    import webdataset as wds

    urls, _ = _read_back(quarantine_story)
    tuples = list(wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "txt", "json"))
    assert len(tuples) == 11 and all(t[0].mode == "RGB" for t in tuples)


def test_a_tar_reader_sees_the_inputs_members_in_order(quarantine_story):
    """img2dataset-style readers group members by key: the order is the input's."""
    urls, _ = _read_back(quarantine_story)
    with tarfile.open(urls[1]) as tar:
        names = [m.name for m in tar]
    assert names == [n for n, _ in quarantine_story.shards["train-000001"] if not n.startswith(("broken", "textonly"))]


def test_worker_that_dies_on_a_shard_is_replaced_and_the_shard_committed_once(ray_local, tmp_path):
    pattern, shards = _corpus(tmp_path, truncated=False)
    cfg = {"purifier": {"name": "none"}, "corpus": {"jpeg_quality": 80},
           "cluster": {"num_workers": 2, "max_attempts": 3, "shard_timeout_s": 120},
           "faults": [{"shard": "train-000001", "mode": "exit", "marker_dir": str(tmp_path / "faults"), "times": 1}]}
    path = tmp_path / "purify.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "purified"
    assert _purify(pattern, str(out), "--config", str(path)) == 0
    m = json.loads((out / "manifest.json").read_text())["stages"][STAGE]["shards"]
    assert m["train-000001"]["attempts"] == 2 and "worker died" in m["train-000001"]["errors"][0]
    table = commit.load_records(str(out), STAGE)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 17                    # one row per sample, no duplicates
    assert table.column("status").to_pylist().count("ok") == 15
    assert set(table.column("purifier_params").to_pylist()) == {"{}"}
    assert None not in table.column("node_id").to_pylist()      # every row names its Ray node
    with tarfile.open(out / "train-000001.tar") as tar:
        assert len([m for m in tar if m.name.endswith(".jpg")]) == 5
    assert yaml.safe_load((out / "config.yaml").read_text())["corpus"]["jpeg_quality"] == 80


@pytest.mark.parametrize("output, extra, message", [
    ("o", ["--purifier", "no-such"], "purifier.name"),
    ("o", [], "no purifier: give --purifier NAME"),                          # not silently `none`
    ("corpus", ["--purifier", "none"], "would overwrite input shard"),
    ("o", ["--purifier", "none", "--crop"], "corpus.crop"),
], ids=["unknown-purifier", "no-purifier", "output-overwrites-input", "crop-without-size"])
def test_purify_refuses_bad_requests_before_work(tmp_path, capsys, output, extra, message):
    pattern, _ = _corpus(tmp_path, truncated=False)
    assert _purify(pattern, str(tmp_path / output), *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
