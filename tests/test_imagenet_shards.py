"""ImageNet scale: make-shards from both validation layouts, the 256/224 transform, the
batch size that adapts to memory, and the GPU path's code (bf16, channels_last, compile) on CPU."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.evaluation import row_chunks, stages
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


# ---------------------------------------------------------------------------- adaptive batch size

class _FakeProtocol:
    def __init__(self, batch_size: int):
        self.batch_size, self.device = batch_size, torch.device("cpu")
        self.defense = types.SimpleNamespace(classifier=None)   # no class count: labels unchecked
        self.rows_choice = row_chunks.Choice(4096, "configured", 0, "a fake protocol: nothing to settle")


def _samples(n: int) -> list[shards.Sample]:
    return [shards.Sample(f"k{i}", np.full((2, 2, 1), i, np.uint8), i % 3) for i in range(n)]


def test_batch_size_halves_on_out_of_memory_and_is_remembered():
    p = _FakeProtocol(8)
    seen = []

    def work(b):
        if len(b.keys) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(list(b.keys))
        return len(b.keys)

    out = [n for _, n in stages.adaptive(p, _samples(10), work)]
    assert p.batch_size == 2 and sum(out) == 10
    assert [k for batch in seen for k in batch] == [f"k{i}" for i in range(10)]  # order kept, nothing twice
    seen.clear()
    list(stages.adaptive(p, _samples(4), work))  # the next shard starts from what fitted
    assert [len(b) for b in seen] == [2, 2]


def test_out_of_memory_on_cpu_and_other_errors():
    assert stages.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not stages.is_out_of_memory(RuntimeError("shape mismatch"))
    p = _FakeProtocol(4)

    def fails(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(stages.adaptive(p, _samples(4), fails))

    def always_oom(b):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # even one sample does not fit: raised
        list(stages.adaptive(p, _samples(4), always_oom))
    assert p.batch_size == 1


# ---------------------------------------------------------------------------- GPU path on CPU

def _digits_protocol(digits_models, tmp_path, **evaluation):
    from pipeline.evaluation.protocol import build_protocol

    cfg = config.from_dict({
        "job": {"name": "t", "output": str(tmp_path / "o")}, "data": {"shards": "unused.tar"},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": digits_models["cnn"]}},
        "purifier": {"name": "dae", "params": {"checkpoint": digits_models["dae"]}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.2, "steps": 2, "step_size": 0.1}, "gradient": "full"}],
        "evaluation": {"runs": 2, **evaluation}})
    return build_protocol(cfg)


def test_bf16_and_channels_last_run_the_same_evaluation_on_cpu(digits_models, tmp_path):
    from pipeline.evaluation.batch import evaluate_batch
    from pipeline.evaluation.defense import FastNet

    images, labels, _ = datasets.load_split("digits", "test")
    x, y = datasets.to_float_nchw(images[:32]), torch.from_numpy(labels[:32])
    keys = [f"d{i}" for i in range(32)]
    ref = evaluate_batch(_digits_protocol(digits_models, tmp_path), x, y, keys)
    p = _digits_protocol(digits_models, tmp_path, precision="bf16", channels_last=True)
    assert isinstance(p.defense.classifier, FastNet) and p.defense.classifier.bf16
    assert isinstance(p.defense.purifier.denoiser, FastNet) and p.defense.purifier.denoiser.bf16
    assert p.defense.classifier.net.normalize is not None
    logits = p.defense.classifier(x)
    assert logits.dtype == torch.float32  # fp32 out of a bf16 network
    rows = evaluate_batch(p, x, y, keys)
    agree = np.mean([a["clean_pred"] == b["clean_pred"] for a, b in zip(ref, rows)])
    assert agree >= 0.9
    assert all(np.isfinite(r["linf"]) and r["linf"] <= 0.2 + 1e-6 for r in rows)  # projection in fp32


def test_bf16_keeps_adp_and_test_time_optimisation_in_fp32():
    from pipeline.evaluation.defense import FastNet, autocast_safe, speed_up
    from pipeline.purifiers.adp import ADPPurifier
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM
    from pipeline.purifiers.nets.score_nets import SmallScoreNet

    adp = ADPPurifier(SmallScoreNet(in_channels=1, width=4))
    ebm = LangevinEBMPurifier(EBM(n_c=1, n_f=4, image_size=8), LangevinEBMSettings(steps=2))
    assert not autocast_safe(adp) and autocast_safe(ebm)
    speed_up(torch.nn.Identity(), adp, "bf16")
    speed_up(torch.nn.Identity(), ebm, "bf16")
    assert isinstance(adp.score_net, FastNet) and not adp.score_net.bf16
    assert isinstance(ebm.energy_net, FastNet) and ebm.energy_net.bf16


def test_config_hash_changes_with_bf16_only():
    base = {"job": {"name": "t", "output": "o"}, "data": {"shards": "s.tar"},
            "classifier": {"name": "small_cnn", "params": {}}, "purifier": {"name": "none"}}
    h = config.from_dict(base, check_components=False).hash()
    fast = {**base, "evaluation": {"channels_last": True, "compile": True}}
    assert config.from_dict(fast, check_components=False).hash() == h
    assert config.from_dict({**base, "evaluation": {"precision": "bf16"}}, check_components=False).hash() != h
    with pytest.raises(config.ConfigError, match="precision"):
        config.from_dict({**base, "evaluation": {"precision": "fp8"}}, check_components=False)


def test_compiled_energy_falls_back_to_eager_for_second_order(monkeypatch):
    """torch.compile'd graphs cannot be differentiated twice: a full gradient through Langevin
    (∇U inside) runs the eager copy, the graph-free chain runs the compiled one — same values."""
    from pipeline.evaluation import defense
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM
    from pipeline.seeding import Noise

    monkeypatch.setattr(defense, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    net = EBM(n_c=1, n_f=4, image_size=8).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    plain = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3, checkpoint_segment=0))
    fast = LangevinEBMPurifier(net, LangevinEBMSettings(steps=3, checkpoint_segment=0))
    defense.speed_up(torch.nn.Identity(), fast, compile=True)
    calls = {"eager": 0}
    fast.energy_net.net.register_forward_hook(lambda *a: calls.__setitem__("eager", calls["eager"] + 1))
    noise = Noise.for_batch(0, ["a", "b"], "c")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, noise), plain(x, noise))
    xg = x.clone().requires_grad_(True)
    (g_fast,) = torch.autograd.grad(fast(xg, noise).sum(), xg)
    (g_plain,) = torch.autograd.grad(plain(xg, noise).sum(), xg)
    torch.testing.assert_close(g_fast, g_plain)
    assert calls["eager"] >= 3  # the second-order pass went eager
