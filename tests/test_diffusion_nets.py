"""The published diffusion networks DiffPure uses: score_sde's DDPM++ deep (CIFAR-10) and
guided-diffusion's 256×256 unconditional U-Net (ImageNet).

Evidence without the official code (tests/fixtures, made by make_diffusion_net_fixtures.py from
yang-song/score_sde_pytorch and openai/guided-diffusion):
- *_keys.json: every state-dict key and shape, and the parameters() order, of the official
  networks at the published configurations, against ours built on the meta device (no memory);
- *_parity.pt: inputs and the official networks' outputs at reduced configurations (same code
  paths) with portable pseudo-random weights, regenerated here bit for bit by `parity_weights`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pytest
import torch

from pipeline.io import checkpoints
from pipeline.purifiers.nets.guided_unet import (
    PUBLISHED_256_UNCOND,
    GuidedUNet,
    load_guided_diffusion,
    read_guided_state_dict,
    resize_bilinear,
)
from pipeline.purifiers.nets.ncsnpp import PUBLISHED_CIFAR10, NCSNpp, load_score_sde, on_meta, read_score_sde_checkpoint

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# reduced configurations of the parity fixtures: the published code paths at a fraction of the size
NCSNPP_PARITY = {"config": {**PUBLISHED_CIFAR10, "nf": 16, "num_res_blocks": 2},
                 "weight_seed": 1, "input_seed": 2, "t": [99.9, 599.4], "batch": 2}  # labels 999·t, t = 0.1, 0.6
GUIDED_PARITY = {"config": {**PUBLISHED_256_UNCOND, "image_size": 64, "model_channels": 32, "num_head_channels": 16},
                 "weight_seed": 3, "input_seed": 4, "t": [150, 600], "batch": 2}   # ⌊1000·t⌋
TINY_NCSNPP = {"nf": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "image_size": 8, "attn_resolutions": (4,),
               "num_scales": 10}
TINY_GUIDED = {"image_size": 16, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
               "attention_resolutions": (8,), "num_head_channels": 16}


# ---------------------------------------------------------------------------------------
# Portable pseudo-random numbers (the parity fixtures' weights and inputs)
# ---------------------------------------------------------------------------------------


def portable_uniform(n: int, seed: int) -> torch.Tensor:
    """n numbers on [−1, 1) from splitmix64(seed, index) in wrapping uint64 arithmetic: the same on
    every machine, numpy and torch version (torch's generators promise no such thing)."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) \
            * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)
    return torch.from_numpy(2.0 * u - 1.0).float()


def parity_weights(named_params: Iterable, seed: int) -> tuple[dict, float]:
    """{name: tensor} of unit-gain random weights for every parameter (so zero-initialised layers
    take part), and their float64 checksum. Matrices and kernels ~ U(±√(3/fan_in)); norm scales
    1 ± 0.25; biases ± 0.25."""
    out, checksum = {}, 0.0
    for k, (name, p) in enumerate(named_params):
        u = portable_uniform(p.numel(), seed * 1_000_003 + k).view(p.shape)
        if p.dim() >= 2:
            w = u * math.sqrt(3.0 / (p.numel() // p.shape[0]))
        elif name.endswith(".weight"):  # GroupNorm scale
            w = 1.0 + 0.25 * u
        else:
            w = 0.25 * u
        out[name] = w
        checksum += float(w.double().abs().sum())
    return out, checksum


def parity_inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = spec["config"]
    channels = cfg.get("channels", cfg.get("in_channels"))
    shape = (spec["batch"], channels, cfg["image_size"], cfg["image_size"])
    x = portable_uniform(math.prod(shape), spec["input_seed"]).view(shape)
    return x, torch.tensor(spec["t"][:spec["batch"]])


def test_portable_uniform_is_pinned():
    u = portable_uniform(5, 7)
    assert u.dtype == torch.float32 and bool((u.abs() < 1).all())
    big = portable_uniform(200_000, 1)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.var()) - 1 / 3) < 0.01  # U(−1, 1)
    torch.testing.assert_close(portable_uniform(3, 7), u[:3])


# ---------------------------------------------------------------------------------------
# Keys, shapes and parameter order at the published configurations (meta device)
# ---------------------------------------------------------------------------------------


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _assert_layout(net: torch.nn.Module, doc: dict) -> None:
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    theirs = doc["state_dict"]
    assert len(ours) == len(theirs)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is None, f"first difference at {first}: ours {ours[first]}, official {theirs[first]}"
    assert [k for k, _ in net.named_parameters()] == doc["parameters"]
    assert sum(p.numel() for p in net.parameters()) == doc["num_parameters"]


def test_ncsnpp_matches_the_published_layout():
    doc = _fixture("ncsnpp_cifar10_keys.json")
    assert doc["config"] == json.loads(json.dumps(PUBLISHED_CIFAR10))
    _assert_layout(on_meta(NCSNpp), doc)   # the defaults are the published configuration
    # the official code's counts at configs/vp/cifar10_ddpmpp_deep_continuous.py (no published count
    # found to check against): 957 state-dict entries = 956 parameters + the `sigmas` buffer
    assert (len(doc["state_dict"]), len(doc["parameters"]), doc["num_parameters"]) == (957, 956, 106_632_579)


def test_guided_unet_matches_the_published_layout():
    doc = _fixture("guided_unet_256_uncond_keys.json")
    assert doc["config"] == json.loads(json.dumps(PUBLISHED_256_UNCOND))
    _assert_layout(on_meta(GuidedUNet), doc)
    # the official code's counts at DiffPure's configs/imagenet.yml: no buffers, 552.8 M parameters
    assert (len(doc["state_dict"]), len(doc["parameters"]), doc["num_parameters"]) == (566, 566, 552_814_086)


# ---------------------------------------------------------------------------------------
# Checkpoint readers: the score_sde layout and guided-diffusion's state dict
# ---------------------------------------------------------------------------------------


def _free(shape) -> torch.Tensor:
    return torch.zeros(()).expand(*shape)  # the shape of a published tensor without its memory


def _score_sde_layout(model: dict, shadow: list) -> dict:
    """What score_sde's run_lib saves: DataParallel keys in `model`, EMA shadows in parameters() order."""
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
            "model": {f"module.{k}": v for k, v in model.items()},
            "ema": {"decay": 0.9999, "num_updates": 100, "shadow_params": shadow}, "step": 8}


def test_score_sde_reader_at_the_published_shapes():
    doc = _fixture("ncsnpp_cifar10_keys.json")
    model = {k: _free(s) for k, s in doc["state_dict"]}
    shapes = dict(doc["state_dict"])
    shadow = [_free(shapes[k]) for k in doc["parameters"]]
    pub = read_score_sde_checkpoint(_score_sde_layout(model, shadow), source="checkpoint_8.pth")
    assert pub.format == "score_sde" and pub.info == {"ema": True, "step": 8}
    assert set(pub.state_dict) == set(model)
    assert pub.state_dict[doc["parameters"][5]] is shadow[5]   # the EMA, not the model's weights
    assert pub.state_dict["sigmas"] is model["sigmas"]         # buffers from `model`

    bad = list(shadow)
    bad[5] = _free([7, 7])
    with pytest.raises(checkpoints.CheckpointError, match=rf"ema.shadow_params\[5\] has shape \(7, 7\), "
                       rf"parameter {doc['parameters'][5]} of NCSNpp\(.*nf=128.*expects"):
        read_score_sde_checkpoint(_score_sde_layout(model, bad), source="checkpoint_8.pth")
    with pytest.raises(checkpoints.CheckpointError, match="holds 2 tensors, NCSNpp.* has 956 parameters"):
        read_score_sde_checkpoint(_score_sde_layout(model, shadow[:2]))
    with pytest.raises(checkpoints.CheckpointError, match="another configuration"):  # e.g. the VE or shallow model
        read_score_sde_checkpoint(_score_sde_layout(model, shadow), arch_params={"num_res_blocks": 4})
    with pytest.raises(checkpoints.CheckpointError, match="expected top-level keys optimizer, model, ema, step"):
        read_score_sde_checkpoint({"state": 1, "params_ema": 2})


def test_score_sde_checkpoint_loads_frozen_with_ema_weights(tmp_path):
    torch.manual_seed(0)
    net = NCSNpp(**TINY_NCSNPP)
    shadow = [p.detach() + 0.01 * torch.randn_like(p) for p in net.parameters()]
    path = tmp_path / "checkpoint_8.pth"
    torch.save(_score_sde_layout(net.state_dict(), shadow), path)
    loaded, info = load_score_sde(str(path), arch_params=TINY_NCSNPP)
    assert info["format"] == "score_sde" and info["ema"] and info["step"] == 8 and info["dtype"] == "float32"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for p, s in zip(loaded.parameters(), shadow):
        torch.testing.assert_close(p, s, rtol=0, atol=0)
    torch.testing.assert_close(loaded.sigmas, net.sigmas)
    raw_model, _ = load_score_sde(str(path), arch_params=TINY_NCSNPP, ema=False)  # the `model` half, strict
    x, labels = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([5.0, 900.0])
    torch.testing.assert_close(raw_model(x, labels), net.eval()(x, labels))

    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint_8.pth: all_modules.0.weight has shape "
                       r"\(32, 8\), the network NCSNpp\(.*nf=16.*expects \(64, 16\): the checkpoint is for another"):
        load_score_sde(str(path), arch_params={**TINY_NCSNPP, "nf": 16}, ema=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_score_sde(str(path), dtype="float16")

    exported = {f"module.{k}": v for k, v in net.state_dict().items()}  # a plain state dict, e.g. exported EMA
    torch.save(exported, path)
    plain, info = load_score_sde(str(path), arch_params=TINY_NCSNPP)
    assert info["format"] == "state_dict"
    xg = x.clone().requires_grad_(True)
    plain(xg, labels).square().sum().backward()   # frozen weights, gradients to the input
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0


class _PickledConfig:  # an arbitrary Python object, as a careless torch.save(…) of a whole config stores
    nf = 8


@pytest.mark.parametrize("load, arch_params", [(load_score_sde, TINY_NCSNPP), (load_guided_diffusion, TINY_GUIDED)])
def test_checkpoints_are_read_with_weights_only(tmp_path, load, arch_params):
    """torch.load(weights_only=True): a file that would need arbitrary unpickling is refused before any
    reader sees it, naming the pickled class (weights_only=False would unpickle it)."""
    net = (NCSNpp if load is load_score_sde else GuidedUNet)(**arch_params)
    state = net.state_dict()
    raw = (_score_sde_layout(state, [p.detach() for p in net.parameters()]) if load is load_score_sde
           else state)
    path = tmp_path / "published.pt"
    torch.save(raw, path)
    load(str(path), arch_params=arch_params)   # the same layout without the object loads
    raw["config"] = _PickledConfig()
    torch.save(raw, path)
    assert isinstance(torch.load(path, weights_only=False)["config"], _PickledConfig)
    with pytest.raises(checkpoints.CheckpointError, match=rf"cannot load checkpoint {path}: it pickles "
                       rf"{__name__}._PickledConfig besides tensors.*weights_only=True"):
        load(str(path), arch_params=arch_params)


def test_guided_reader_at_the_published_shapes():
    doc = _fixture("guided_unet_256_uncond_keys.json")
    state = {k: _free(s) for k, s in doc["state_dict"]}
    pub = read_guided_state_dict(state, source="256x256_diffusion_uncond.pt")
    assert pub.format == "guided_diffusion" and pub.arch_params == PUBLISHED_256_UNCOND
    key = "input_blocks.10.1.qkv.weight"  # the first attention (32 px)
    with pytest.raises(checkpoints.CheckpointError, match=rf"256x256_diffusion_uncond.pt: {key} has shape \(3, 3\)"):
        read_guided_state_dict({**state, key: _free([3, 3])}, source="256x256_diffusion_uncond.pt")
    with pytest.raises(checkpoints.CheckpointError, match="not a guided-diffusion checkpoint"):
        read_guided_state_dict({"model": state})


def test_guided_state_dict_loads_strict(tmp_path):
    torch.manual_seed(0)
    net = GuidedUNet(**TINY_GUIDED)
    path = tmp_path / "uncond.pt"
    torch.save(net.state_dict(), path)
    loaded, info = load_guided_diffusion(str(path), arch_params=TINY_GUIDED)
    assert info["format"] == "guided_diffusion" and not loaded.training
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 999])
    out = loaded(x, t)
    assert out.shape == (2, 6, 16, 16)
    torch.testing.assert_close(out, net.eval()(x, t))
    state = net.state_dict()
    del state["out.2.bias"]
    torch.save(state, path)
    with pytest.raises(checkpoints.CheckpointError, match=r"missing \['out.2.bias'\]"):
        load_guided_diffusion(str(path), arch_params=TINY_GUIDED)


# ---------------------------------------------------------------------------------------
# Output parity with the official code (reference outputs in the fixtures)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, make, name", [(NCSNPP_PARITY, NCSNpp, "ncsnpp_parity.pt"),
                                              (GUIDED_PARITY, GuidedUNet, "guided_unet_parity.pt")])
def test_output_parity_with_the_official_code(spec, make, name):
    ref = torch.load(FIXTURES / name, weights_only=True)
    assert ref["config"] == spec["config"] and ref["weight_seed"] == spec["weight_seed"]
    net = make(**spec["config"]).eval()
    weights, checksum = parity_weights(net.named_parameters(), spec["weight_seed"])
    assert checksum == pytest.approx(ref["weight_checksum"], rel=1e-12), "the portable weights changed"
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not unexpected and missing == [k for k, _ in net.named_buffers()]
    x, t = parity_inputs(spec)
    torch.testing.assert_close(x, ref["x"], rtol=0, atol=0)
    torch.testing.assert_close(t, ref["t"], rtol=0, atol=0)
    with torch.no_grad():
        out = net(x, t)
    scale = float(ref["out"].abs().max())
    assert scale > 0.1  # every layer carries signal: no zero-initialised layer hides a difference
    assert float((out - ref["out"]).abs().max()) < 1e-4 * scale


# ---------------------------------------------------------------------------------------
# bf16, input checks, the ImageNet resize
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, cfg, t", [(NCSNpp, TINY_NCSNPP, [50.0, 700.0]), (GuidedUNet, TINY_GUIDED, [50, 700])])
def test_bfloat16_forward_tracks_float32(make, cfg, t):
    torch.manual_seed(0)
    net = make(**cfg).eval()
    net.load_state_dict(parity_weights(net.named_parameters(), 5)[0], strict=False)
    size = cfg["image_size"]
    x, t = torch.rand(2, 3, size, size) * 2 - 1, torch.tensor(t)
    with torch.no_grad():
        ref = net(x, t)
        net.to(torch.bfloat16)
        out = net(x, t)               # float32 in → float32 out, bf16 inside
        out_bf = net(x.bfloat16(), t)
    assert net.dtype == torch.bfloat16 and out.dtype == torch.float32 and out_bf.dtype == torch.bfloat16
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.05, rel          # bf16 keeps ~3 significant digits per operation


def test_published_cifar10_network_runs_in_bfloat16():
    """DDPM++ deep at the published size (106.6 M parameters, random weights) in bf16 as the
    loaders cast it: float32 in and out, close to float32. (The 552.8 M-parameter ImageNet
    U-Net takes ~30 s a forward on a CPU: benchmarks/diffpure_plan.py --bf16 runs it.)"""
    torch.manual_seed(0)
    net = NCSNpp(**PUBLISHED_CIFAR10).eval()
    x, t = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([99.9])
    with torch.no_grad():
        ref = net(x, t)
        out = net.to(torch.bfloat16)(x, t)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (1, 3, 32, 32)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_loaders_cast_to_bfloat16(tmp_path):
    net = GuidedUNet(**TINY_GUIDED)
    torch.save(net.state_dict(), tmp_path / "g.pt")
    loaded, info = load_guided_diffusion(str(tmp_path / "g.pt"), arch_params=TINY_GUIDED, dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded(torch.zeros(1, 3, 16, 16), torch.tensor([10])).dtype == torch.float32


def test_wrong_input_size_is_refused():
    with pytest.raises(ValueError, match=r"NCSNpp expects \[N, 3, 8, 8\] inputs, got \(1, 3, 16, 16\)"):
        NCSNpp(**TINY_NCSNPP)(torch.zeros(1, 3, 16, 16), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"GuidedUNet expects \[N, 3, 16, 16\]"):
        GuidedUNet(**TINY_GUIDED)(torch.zeros(1, 3, 224, 224), torch.tensor([1]))


def test_imagenet_resize_is_bilinear_without_corner_alignment():
    ramp = torch.arange(224, dtype=torch.float32).expand(1, 3, 224, 224)
    up = resize_bilinear(ramp, 256)
    assert up.shape == (1, 3, 256, 256)
    # align_corners=False samples input coordinate (i + ½)·224/256 − ½ (clamped at the borders)
    i = torch.arange(256, dtype=torch.float32)
    expect = ((i + 0.5) * 224 / 256 - 0.5).clamp(0, 223)
    torch.testing.assert_close(up[0, 0, 0], expect)
    back = resize_bilinear(up, 224)
    assert back.shape == (1, 3, 224, 224)
    assert float((back - ramp)[..., 2:-2].abs().max()) < 1e-3   # a ramp survives the round trip
    x = torch.rand(2, 3, 224, 224)
    assert resize_bilinear(x, 224) is x
    y = resize_bilinear(x, 256)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
