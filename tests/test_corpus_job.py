"""`advpure purify` end to end on Ray: quarantine, resume, exactly once, indexes, and the
output read back by WebDataset and by an img2dataset-style tar reader."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

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


def test_purify_quarantines_resumes_and_reads_back(ray_local, tmp_path, capsys):
    pattern, shards = _corpus(tmp_path)
    out = tmp_path / "purified"
    args = [pattern, str(out), "--purifier", "none", "--workers", "2", "--set", "cluster.max_attempts=2",
            "--set", "cluster.shard_timeout_s=120"]
    assert _purify(*args) == 3                                   # one shard quarantined
    text = capsys.readouterr().out
    assert "purified 11 of 13 samples into 2 of 3 shards" in text
    assert "dropped: decode_error 1, no_image 1" in text and "train-000002 QUARANTINED" in text
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["corpus"]
    assert c["quarantined"]["train-000002"].count("truncated") == 1
    assert c["shards"]["train-000001"] == {"samples": 7, "ok": 5, "dropped": {"decode_error": 1, "no_image": 1},
                                           "output": "train-000001.tar", "empty": False, "non_file_members": 0}
    assert not (out / "train-000002.tar").exists()
    _check_indexes(out, {"train-000000.tar": 6, "train-000001.tar": 5})
    _check_read_back(out, shards)
    first = _markers(out)

    assert _purify(*args) == 3                                   # resume: committed shards are skipped
    assert _markers(out) == first
    pattern, _ = _corpus(tmp_path, truncated=False)              # the shard is repaired
    assert _purify(*args) == 0
    after = _markers(out)
    assert {k: after[k] for k in first} == first and set(after) == set(shards)
    _check_indexes(out, {"train-000000.tar": 6, "train-000001.tar": 5, "train-000002.tar": 4})


def _check_indexes(out, counts: dict[str, int]) -> None:
    wids = json.loads((out / "wids-index.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
    assert {e["url"]: e["nsamples"] for e in wids["shardlist"]} == counts
    for e in wids["shardlist"]:
        data = (out / e["url"]).read_bytes()
        assert e["filesize"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    own = json.loads((out / "index.json").read_text())
    assert own["total_samples"] == sum(counts.values())


def _check_read_back(out, shards: dict[str, list]) -> None:
    """WebDataset and a plain tar reader (img2dataset's layout) see the input's keys, fields
    and formats; only the image bytes changed."""
    import webdataset as wds

    ok = {name: data for sid in ("train-000000", "train-000001") for name, data in shards[sid]
          if not name.startswith(("broken", "textonly"))}
    urls = [str(out / "train-000000.tar"), str(out / "train-000001.tar")]
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        k = s["__key__"]
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "json", "cls"}
        assert s["txt"] == ok[f"{k}.txt"].decode() and s["json"] == json.loads(ok[f"{k}.json"])
        assert s["cls"] == int(ok[f"{k}.cls"])
        assert s["jpg"].size == Image.open(io.BytesIO(ok[f"{k}.jpg"])).size
        seen += 1
    assert seen == 11
    for s in wds.WebDataset(urls, shardshuffle=False):            # undecoded: the bytes are a JPEG again
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG" and s["jpg"] != ok[f"{s['__key__']}.jpg"]
    tuples = list(wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "txt", "json"))
    assert len(tuples) == 11 and all(t[0].mode == "RGB" for t in tuples)
    with tarfile.open(urls[1]) as tar:                          # img2dataset-style: group members by key
        names = [m.name for m in tar]
    assert names == [n for n, _ in shards["train-000001"] if not n.startswith(("broken", "textonly"))]


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


def test_purify_refuses_bad_requests_before_work(tmp_path, capsys):
    pattern, _ = _corpus(tmp_path, truncated=False)
    assert _purify(pattern, str(tmp_path / "o"), "--purifier", "no-such") == 2
    assert "purifier.name" in capsys.readouterr().err
    assert _purify(pattern, str(tmp_path / "corpus"), "--purifier", "none") == 2   # would overwrite the input
    assert "would overwrite input shard" in capsys.readouterr().err
    assert _purify(pattern, str(tmp_path / "o"), "--purifier", "none", "--crop") == 2
    assert "corpus.crop" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
