"""Score and energy networks: architectures, key layouts of published checkpoints."""
from __future__ import annotations

import pytest
import torch

from pipeline.io import checkpoints
from pipeline.purifiers.adp import ADPPurifier
from pipeline.purifiers.nets import score_nets
from pipeline.purifiers.nets.ebm_nets import EBM
from pipeline.purifiers.nets.score_nets import NCSNv2, SmallScoreNet, ncsnv2_state_from_raw
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

torch.set_num_threads(1)

TINY = {"channels": 3, "ngf": 4, "num_classes": 10, "sigma_begin": 1.0, "sigma_end": 0.01}

# key names of the NCSNv2 code (models/ncsnv2.py + layers.py + normalization.py)
NCSNV2_KEYS = [
    "sigmas", "begin_conv.weight", "begin_conv.bias", "normalizer.alpha", "normalizer.gamma",
    "normalizer.beta", "end_conv.weight", "end_conv.bias",
    "res1.0.normalize1.alpha", "res1.0.conv1.weight", "res1.0.normalize2.beta", "res1.0.conv2.bias",
    "res2.0.conv2.conv.weight", "res2.0.shortcut.conv.weight", "res2.0.shortcut.conv.bias",
    "res3.0.conv1.weight", "res3.0.shortcut.weight", "res4.1.conv2.bias",
    "refine1.adapt_convs.0.1_1_conv.weight", "refine1.adapt_convs.0.2_2_conv.weight",
    "refine1.crp.convs.0.weight", "refine1.crp.convs.1.weight", "refine1.output_convs.1_2_conv.weight",
    "refine2.msf.convs.0.weight", "refine2.msf.convs.1.bias", "refine3.adapt_convs.1.2_1_conv.weight",
    "refine4.output_convs.3_2_conv.weight",
]
NOT_NCSNV2_KEYS = ["refine1.msf.convs.0.weight", "res1.0.shortcut.weight", "res2.1.shortcut.weight",
                   "refine1.crp.convs.0.bias", "refine4.output_convs.4_1_conv.weight"]


def test_ncsnv2_key_layout_and_shapes():
    sd = NCSNv2(**TINY).state_dict()
    missing = [k for k in NCSNV2_KEYS if k not in sd]
    assert not missing, missing
    assert not [k for k in NOT_NCSNV2_KEYS if k in sd]
    assert len(sd) == 154
    assert sd["res2.0.conv2.conv.weight"].shape == (8, 4, 3, 3)
    assert sd["res3.0.conv1.weight"].shape == (8, 8, 3, 3)
    assert sd["sigmas"].shape == (10,)
    torch.testing.assert_close(sd["sigmas"][[0, -1]], torch.tensor([1.0, 0.01]))
    net = NCSNv2(**TINY).eval()
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert out.shape == x.shape
    labels = torch.tensor([0, 9])
    torch.testing.assert_close(net(x, labels), out / net.sigmas[labels].view(-1, 1, 1, 1))
    assert NCSNv2(channels=1, ngf=4, num_classes=3, image_size=28)(torch.rand(1, 1, 28, 28)).shape == (1, 1, 28, 28)


def test_published_cifar10_ncsnv2_size():
    net = NCSNv2()  # the published CIFAR-10 config: ngf 128, 232 σ from 50 to 0.01 (count: ours, pinned)
    assert sum(p.numel() for p in net.parameters()) == 29_694_083
    torch.testing.assert_close(net.sigmas[[0, -1]], torch.tensor([50.0, 0.01]))


def _ncsnv2_list_checkpoint(path, net):
    """What the NCSNv2 runner saves: [model, optimizer, epoch, step, ema] with module. keys."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(torch.rand(1, 3, 32, 32)).sum().backward()
    opt.step()
    shadow = {k: v.detach() + 0.01 for k, v in net.named_parameters()}  # EMAHelper: unprefixed
    model = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save([model, opt.state_dict(), 3, 1000, shadow], path)
    return shadow


def test_ncsnv2_list_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = NCSNv2(**TINY)
    path = tmp_path / "checkpoint.pth"
    shadow = _ncsnv2_list_checkpoint(path, net)
    net.eval()
    p = PURIFIERS.build("adp", checkpoint=str(path), net=TINY, max_iter=2)
    assert isinstance(p, ADPPurifier) and p.record()["net_format"] == "ncsnv2"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(p.score_net(x), net(x))
    assert p(x, Noise.for_batch(0, ["a", "b"], "c")).shape == x.shape
    # EMA weights (item 4) on request
    pe = PURIFIERS.build("adp", checkpoint=str(path), net=TINY, ema=True)
    for name, value in pe.score_net.named_parameters():
        torch.testing.assert_close(value, shadow[name])
    # the wrong architecture is refused with the key names in the message
    with pytest.raises(checkpoints.CheckpointError):
        PURIFIERS.build("adp", checkpoint=str(path), net={**TINY, "ngf": 8})


def test_ncsnv2_plain_state_dict_with_and_without_prefix(tmp_path):
    torch.manual_seed(1)
    net = NCSNv2(**TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    for name, sd in (("plain.pth", net.state_dict()),
                     ("dp.pth", {f"module.{k}": v for k, v in net.state_dict().items()})):
        torch.save(sd, tmp_path / name)
        loaded, info = score_nets.load_score_net(str(tmp_path / name), arch_params=TINY)
        torch.testing.assert_close(loaded(x), net(x))
        assert info["format"] == "ncsnv2"
    with pytest.raises(checkpoints.CheckpointError):
        ncsnv2_state_from_raw(net.state_dict(), ema=True)
    with pytest.raises(checkpoints.CheckpointError):
        ncsnv2_state_from_raw([{"a": 1}])


def test_small_score_net_sizes():
    net = SmallScoreNet(in_channels=1, width=4)
    for size in (8, 28):
        assert net(torch.rand(2, 1, size, size)).shape == (2, 1, size, size)
    with pytest.raises(ValueError):
        net(torch.rand(1, 1, 30, 30))


def test_published_ebm_layout_and_digit_variants():
    sd = EBM().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("weight")}
    assert shapes == {"f.0.weight": (32, 3, 3, 3), "f.2.weight": (64, 32, 4, 4), "f.4.weight": (128, 64, 4, 4),
                      "f.6.weight": (256, 128, 4, 4), "f.8.weight": (1, 256, 4, 4)}
    assert sum(v.numel() for v in sd.values()) == 693_569
    assert EBM()(torch.rand(1, 3, 32, 32)).shape == (1,)
    for size, kernel in ((28, 3), (8, 1)):
        net = EBM(n_c=1, n_f=8, image_size=size)
        assert net.f[8].kernel_size == (kernel, kernel)
        assert net(torch.rand(3, 1, size, size)).shape == (3,)


def test_ebm_names_the_image_size_it_takes():
    from pipeline.purifiers.nets import InputSizeError

    with pytest.raises(InputSizeError, match=r"ebm needs 8×8 images .*; this image is 9×9"):
        EBM(n_c=1, n_f=4, image_size=8)(torch.zeros(2, 1, 9, 9))   # the last kernel would still fit: a wrong energy
