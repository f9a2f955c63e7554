"""ImageNet scale: make-shards from both validation layouts, the 256/224 transform, the
ImageNet config. The batch size that adapts to memory: tests/test_stages.py; the GPU path's
code (bf16, channels_last, compile) on CPU: tests/test_defense.py."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.io import datasets, shards
from pipeline.io.make_shards import make_shards

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(path, w: int, h: int, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, quality=95)


def _folder_layout(root) -> list[tuple[str, int]]:
    sizes = [(500, 375), (375, 500), (256, 300), (640, 480)]
    out = []
    for ci, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for j, (w, h) in enumerate(sizes[: 2 + ci % 2]):
            name = f"ILSVRC2012_val_{ci * 10 + j:08d}"
            _jpeg(root / wnid / f"{name}.JPEG", w, h, "L" if j == 1 else "RGB", seed=ci * 10 + j)
            out.append((name, ci))
    return out


def test_preprocess_is_resize_256_then_centre_crop_224():
    im = Image.fromarray(np.arange(512 * 256 * 3, dtype=np.uint32).reshape(256, 512, 3).astype(np.uint8))
    out = datasets.imagenet_preprocess(im)          # shorter side already 256: a pure crop
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(im)[16:240, 144:368])
    big = Image.new("RGB", (1000, 500), (10, 20, 30))
    small = datasets.imagenet_preprocess(big.convert("CMYK"))  # any mode → RGB
    assert small.shape == (224, 224, 3)
    assert tuple(small[100, 100]) == pytest.approx((10, 20, 30), abs=2)
    # torchvision's size rule: short side 256, long side int(256 · long / short)
    im = Image.new("RGB", (333, 500))
    w, h = im.size
    assert (256, int(256 * h / w)) == (256, 384)


def test_make_shards_from_class_folders(tmp_path):
    expected = _folder_layout(tmp_path / "val")
    doc = make_shards("imagenet", str(tmp_path / "shards"), path=str(tmp_path / "val"), samples_per_shard=4)
    assert doc["total_samples"] == len(expected) and len(doc["shards"]) == 2
    got = [s for url in shards.expand(doc["pattern"]) for s in shards.read_shard(url)]
    assert [(s.key, s.label) for s in got] == expected
    assert all(s.image.shape == (224, 224, 3) and s.image.dtype == np.uint8 for s in got)
    assert doc["classes"] == WNIDS and doc["num_classes"] == 3


def test_make_shards_from_flat_folder_with_ground_truth(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = [("ILSVRC2012_val_00000001", WNIDS[2]), ("ILSVRC2012_val_00000002", WNIDS[0]),
            ("ILSVRC2012_val_00000003", WNIDS[1])]
    for i, (name, _) in enumerate(rows):
        _jpeg(flat / f"{name}.JPEG", 300 + 10 * i, 260, seed=i)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{n},{w} 1 2 3 4 {w} 5 6 7 8\n" for n, w in rows))
    classes = tmp_path / "LOC_synset_mapping.txt"
    classes.write_text("".join(f"{w} some words\n" for w in WNIDS))
    doc = make_shards("imagenet", str(tmp_path / "s1"), path=str(flat), samples_per_shard=10,
                      options={"labels": str(csv), "classes": str(classes)})
    got = shards.read_shard(shards.expand(doc["pattern"])[0])
    assert [(s.key, s.label) for s in got] == [(n, WNIDS.index(w)) for n, w in rows]
    listing = tmp_path / "val.txt"  # caffe-style `<file> <index>`
    listing.write_text("".join(f"{n}.JPEG {7 + i}\n" for i, (n, _) in enumerate(rows)))
    doc = make_shards("imagenet", str(tmp_path / "s2"), path=str(flat), options={"labels": str(listing)})
    assert [s.label for s in shards.read_shard(shards.expand(doc["pattern"])[0])] == [7, 8, 9]


def test_make_shards_imagenet_errors_name_the_problem(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    _jpeg(flat / "a.JPEG", 300, 300)
    with pytest.raises(datasets.DatasetError, match="--labels"):
        make_shards("imagenet", str(tmp_path / "o"), path=str(flat))
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n")
    with pytest.raises(datasets.DatasetError, match="meta.mat"):
        make_shards("imagenet", str(tmp_path / "o"), path=str(flat), options={"labels": str(devkit)})
    other = tmp_path / "gt.txt"
    other.write_text("b.JPEG n01440764\n")
    with pytest.raises(datasets.DatasetError, match="no label for 1 image"):
        make_shards("imagenet", str(tmp_path / "o"), path=str(flat), options={"labels": str(other)})


def test_cli_make_shards_imagenet(tmp_path, capsys):
    from pipeline import cli

    _folder_layout(tmp_path / "val")
    assert cli.main(["make-shards", "imagenet", str(tmp_path / "out"), "--path", str(tmp_path / "val"),
                     "--samples-per-shard", "100"]) == 0
    assert "wrote 7 samples in 1 shards" in capsys.readouterr().out


def test_imagenet_config_loads_and_overrides_to_the_baseline():
    cfg = config.load("configs/imagenet_resnet50.yaml", check_components=False)
    assert cfg.classifier.name == "resnet50" and cfg.purifier.name == "gaussian"
    assert cfg.attacks[0].params["eps"] == pytest.approx(4 / 255, abs=1e-6)
    assert cfg.evaluation.precision == "bf16" and cfg.evaluation.channels_last
    base = config.load("configs/imagenet_resnet50.yaml", ["purifier.name=none", "purifier.params={}",
                                                          "attacks.1.eot=1", "classifier.params={random_init: true}"])
    assert base.purifier.name == "none"


# ---------------------------------------------------------------------------- bf16 in the config hash

def test_config_hash_changes_with_bf16_only():
    base = {"job": {"name": "t", "output": "o"}, "data": {"shards": "s.tar"},
            "classifier": {"name": "small_cnn", "params": {}}, "purifier": {"name": "none"}}
    h = config.from_dict(base, check_components=False).hash()
    fast = {**base, "evaluation": {"channels_last": True, "compile": True}}
    assert config.from_dict(fast, check_components=False).hash() == h
    assert config.from_dict({**base, "evaluation": {"precision": "bf16"}}, check_components=False).hash() != h
    with pytest.raises(config.ConfigError, match="precision"):
        config.from_dict({**base, "evaluation": {"precision": "fp8"}}, check_components=False)
