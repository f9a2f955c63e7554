"""WideResNet / ResNet classifiers: published key layouts, containers, sizes, gradients.

The reference forwards below are functional re-statements of the published networks
(TRADES/RobustBench WideResNet, meliketoy/Hill WideResNet, torchvision ResNet) that read
tensors by the published key names only, so a pass means: our modules carry those keys
and compute the same function from them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.classifiers import resnet, wideresnet
from pipeline.io.checkpoints import CheckpointError
from pipeline.registry import CLASSIFIERS

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# functional references, by published key names
# ---------------------------------------------------------------------------------------


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], False, 0.0, 1e-5)


def _conv(x, sd, p, stride=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd.get(f"{p}.bias"), stride, w.shape[-1] // 2)


def ref_wrn_robustbench(sd, x, depth):
    """TRADES BasicBlock: where in != out the shortcut is convShortcut(relu(bn1(x)))."""
    n = (depth - 4) // 6
    out = _conv(x, sd, "conv1")
    for g, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            p, s = f"block{g}.layer.{i}", (stride if i == 0 else 1)
            a = F.relu(_bn(out, sd, f"{p}.bn1"))
            short = _conv(a, sd, f"{p}.convShortcut", s) if f"{p}.convShortcut.weight" in sd else out
            h = F.relu(_bn(_conv(a, sd, f"{p}.conv1", s), sd, f"{p}.bn2"))
            out = short + _conv(h, sd, f"{p}.conv2")
    out = F.relu(_bn(out, sd, "bn1"))
    return F.linear(F.avg_pool2d(out, 8).flatten(1), sd["fc.weight"], sd["fc.bias"])


def ref_wrn_meliketoy(sd, x, depth):
    """meliketoy wide_basic: stride on conv2, shortcut on the raw input."""
    n = (depth - 4) // 6
    out = _conv(x, sd, "conv1")
    for g, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            p, s = f"layer{g}.{i}", (stride if i == 0 else 1)
            h = _conv(F.relu(_bn(out, sd, f"{p}.bn1")), sd, f"{p}.conv1")
            h = _conv(F.relu(_bn(h, sd, f"{p}.bn2")), sd, f"{p}.conv2", s)
            out = h + (_conv(out, sd, f"{p}.shortcut.0", s) if f"{p}.shortcut.0.weight" in sd else out)
    out = F.relu(_bn(out, sd, "bn1"))
    return F.linear(F.avg_pool2d(out, 8).flatten(1), sd["linear.weight"], sd["linear.bias"])


def ref_torchvision_resnet(sd, x, counts, bottleneck, stem="imagenet"):
    out = F.relu(_bn(_conv(x, sd, "conv1", 2 if stem == "imagenet" else 1), sd, "bn1"))
    if stem == "imagenet":
        out = F.max_pool2d(out, 3, 2, 1)
    for L, n in enumerate(counts, start=1):
        for i in range(n):
            p, s = f"layer{L}.{i}", (2 if L > 1 and i == 0 else 1)
            if bottleneck:
                h = F.relu(_bn(_conv(out, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
                h = F.relu(_bn(_conv(h, sd, f"{p}.conv2", s), sd, f"{p}.bn2"))
                h = _bn(_conv(h, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            else:
                h = F.relu(_bn(_conv(out, sd, f"{p}.conv1", s), sd, f"{p}.bn1"))
                h = _bn(_conv(h, sd, f"{p}.conv2"), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                short = _bn(_conv(out, sd, f"{p}.downsample.0", s), sd, f"{p}.downsample.1")
            else:
                short = out
            out = F.relu(h + short)
    return F.linear(out.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def randomised_state(net: torch.nn.Module, seed: int = 0) -> dict:
    """The net's state with random BN affine and running statistics (so they matter)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        if k.endswith(".weight") and v.dim() == 1:
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    return sd


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------------------------------
# key layouts and forward semantics
# ---------------------------------------------------------------------------------------

RB_KEYS = ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight",
           "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
           "block3.layer.3.conv2.weight", "bn1.running_var", "fc.weight", "fc.bias"]
MK_KEYS = ["conv1.weight", "conv1.bias", "layer1.0.bn1.weight", "layer1.0.conv1.bias",
           "layer1.0.shortcut.0.weight", "layer1.0.shortcut.0.bias", "layer3.3.conv2.weight",
           "bn1.running_mean", "linear.weight", "linear.bias"]
TV_R50_KEYS = ["conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer1.0.bn3.weight",
               "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
               "layer4.2.conv2.weight", "fc.weight", "fc.bias"]


@pytest.mark.parametrize("depth,widen", [(10, 1), (16, 2)])
def test_wrn_layouts_match_published_forward(depth, widen):
    x = torch.rand(2, 3, 32, 32)
    for layout, ref in (("robustbench", ref_wrn_robustbench), ("meliketoy", ref_wrn_meliketoy)):
        net = wideresnet.make_net(layout, depth, widen, 10).eval()
        sd = randomised_state(net)
        net.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref(sd, x, depth), rtol=1e-4, atol=1e-4)


def test_wrn28_10_keys_and_param_counts():
    rb = wideresnet.make_net("robustbench")
    sd = rb.state_dict()
    assert all(k in sd for k in RB_KEYS)
    assert "block1.layer.1.convShortcut.weight" not in sd and not any(k.startswith("sub_block1") for k in sd)
    # WRN-28-10: 36.5M (Zagoruyko & Komodakis, Table 1); count from the layer shapes:
    n, k = 4, 10
    conv = lambda i, o, s=3: i * o * s * s
    bn = lambda c: 2 * c
    expect = conv(3, 16) + bn(64 * k) + 64 * k * 10 + 10
    for cin, c in ((16, 16 * k), (16 * k, 32 * k), (32 * k, 64 * k)):
        expect += bn(cin) + conv(cin, c) + bn(c) + conv(c, c) + conv(cin, c, 1)
        expect += (n - 1) * (bn(c) + conv(c, c) + bn(c) + conv(c, c))
    assert n_params(rb) == expect == 36_479_194
    mk = wideresnet.make_net("meliketoy")
    assert all(k in mk.state_dict() for k in MK_KEYS)
    assert n_params(mk) == 36_479_194 + 10_096  # + conv biases (16 + 2·(160·4 + 320·4 + 640·4) + 160 + 320 + 640)
    assert 16 + 2 * (160 + 320 + 640) * 4 + 160 + 320 + 640 == 10_096


def test_resnet_keys_param_counts_and_published_forward():
    r50 = resnet.ResNet(50, 1000, "imagenet")
    sd50 = r50.state_dict()
    assert all(k in sd50 for k in TV_R50_KEYS)
    assert not any(".shortcut." in k or k.startswith("linear") for k in sd50)
    assert n_params(r50) == 25_557_032  # torchvision resnet50 num_params
    assert n_params(resnet.ResNet(18, 1000, "imagenet")) == 11_689_512  # torchvision resnet18
    r18c = resnet.ResNet(18, 10, "cifar")
    assert n_params(r18c) == 11_173_962  # kuangliu / RobustBench CIFAR ResNet18
    assert n_params(resnet.ResNet(34, 10, "cifar")) == 21_282_122

    r50.eval()
    sd = randomised_state(r50, seed=1)
    r50.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(r50(x), ref_torchvision_resnet(sd, x, (3, 4, 6, 3), True), rtol=1e-4, atol=1e-4)
    r18c.eval()
    sd = randomised_state(r18c, seed=2)
    r18c.load_state_dict(sd)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(r18c(x), ref_torchvision_resnet(sd, x, (2, 2, 2, 2), False, "cifar"),
                                   rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# registry builders: shapes, normalisation, containers
# ---------------------------------------------------------------------------------------


def test_registered_names_and_shapes():
    names = CLASSIFIERS.names()
    for name in ("wrn28_10", "wideresnet", "resnet18_cifar", "resnet34_cifar", "resnet50", "resnet"):
        assert name in names
    m = CLASSIFIERS.build("wrn28_10", random_init=True)
    assert not m.training and m.num_classes == 10
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    m = CLASSIFIERS.build("resnet50", random_init=True)
    torch.testing.assert_close(m.normalize.mean.flatten(), torch.tensor(resnet.IMAGENET_MEAN))
    with torch.no_grad():
        assert m(torch.rand(1, 3, 224, 224)).shape == (1, 1000)
    m = CLASSIFIERS.build("resnet18_cifar", random_init=True, num_classes=100)
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    m = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=2, random_init=True, num_classes=7)
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    # random_init is deterministic (every worker of a job builds the same weights)
    a = CLASSIFIERS.build("resnet18_cifar", random_init=True)
    torch.testing.assert_close(a.net.fc.weight, CLASSIFIERS.build("resnet18_cifar", random_init=True).net.fc.weight)


def test_checkpoint_required_unless_random_init(tmp_path):
    with pytest.raises(ValueError, match="random_init"):
        CLASSIFIERS.build("wrn28_10")
    with pytest.raises(ValueError, match="random_init"):
        CLASSIFIERS.build("resnet50")
    with pytest.raises(ValueError, match="exclude"):
        CLASSIFIERS.build("resnet50", checkpoint=str(tmp_path / "x.pt"), random_init=True)
    with pytest.raises(ValueError, match="preset"):
        CLASSIFIERS.build("wrn28_10", preset="nope", random_init=True)
    with pytest.raises(ValueError, match="6n"):
        CLASSIFIERS.build("wideresnet", depth=27, random_init=True)


def test_presets_set_normalisation():
    for preset, mean, std in (("robustbench", 0.0, 1.0), ("hill", 0.5, 0.5)):
        m = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, preset=preset, random_init=True)
        assert torch.all(m.normalize.mean == mean) and torch.all(m.normalize.std == std)
    m = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, preset="adp", random_init=True)
    assert isinstance(m.net, wideresnet.WideResNetMeliketoy)
    torch.testing.assert_close(m.normalize.std.flatten(), torch.tensor(wideresnet.CIFAR10_STD))
    m = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, preset="hill", mean=[0.1, 0.2, 0.3],
                          layout="robustbench", random_init=True)
    assert isinstance(m.net, wideresnet.WideResNet)
    torch.testing.assert_close(m.normalize.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    # the Hill convention: the network sees 2x − 1
    x = torch.rand(2, 3, 32, 32)
    hill = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, preset="hill", random_init=True)
    with torch.no_grad():
        torch.testing.assert_close(hill(x), hill.net(2 * x - 1))


CONTAINERS = [
    ("plain", lambda sd: sd),
    ("state_dict", lambda sd: {"state_dict": sd, "epoch": 100}),
    ("model_state_dict", lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3}),
    ("net", lambda sd: {"net": sd, "acc": 95.1, "epoch": 199}),
]


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("container", [c for c, _ in CONTAINERS])
def test_containers_load_through_registry(tmp_path, container, prefix):
    wrap = dict(CONTAINERS)[container]
    x = torch.rand(2, 3, 32, 32)
    for preset, kw in (("robustbench", {}), ("hill", {})):
        src = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=2, preset=preset, random_init=True, **kw)
        sd = randomised_state(src.net, seed=3)
        src.net.load_state_dict(sd)
        path = _save(wrap({prefix + k: v for k, v in sd.items()}), tmp_path / f"{preset}.pt")
        got = CLASSIFIERS.build("wideresnet", checkpoint=path, depth=10, widen_factor=2, preset=preset)
        assert not got.training
        with torch.no_grad():
            torch.testing.assert_close(got(x), src(x), rtol=0, atol=0)


def test_wrn28_10_full_size_roundtrip(tmp_path):
    """The RobustBench file layout: {'state_dict': DataParallel keys} plus TRADES' unused sub_block1."""
    src = CLASSIFIERS.build("wrn28_10", random_init=True)
    sd = {f"module.{k}": v for k, v in src.net.state_dict().items()}
    sd["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(160, 16, 3, 3)
    path = _save({"state_dict": sd}, tmp_path / "Standard.pt")
    got = CLASSIFIERS.build("wrn28_10", checkpoint=path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x), rtol=0, atol=0)


def test_torchvision_resnet50_and_kuangliu_resnet18_load(tmp_path):
    src = CLASSIFIERS.build("resnet50", random_init=True)
    path = _save(src.net.state_dict(), tmp_path / "resnet50-0676ba61.pth")  # torchvision: plain dict
    got = CLASSIFIERS.build("resnet50", checkpoint=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x), rtol=0, atol=0)

    # kuangliu/pytorch-cifar ckpt.pth: {'net': DataParallel state, 'acc', 'epoch'}, shortcut/linear names
    src = CLASSIFIERS.build("resnet18_cifar", random_init=True, preset="pytorch_cifar")
    sd = {}
    for k, v in src.net.state_dict().items():
        k = k.replace(".downsample.", ".shortcut.")
        sd["module." + ("linear." + k[3:] if k.startswith("fc.") else k)] = v
    assert "module.layer2.0.shortcut.0.weight" in sd and "module.linear.weight" in sd
    path = _save({"net": sd, "acc": 95.0, "epoch": 200}, tmp_path / "ckpt.pth")
    got = CLASSIFIERS.build("resnet18_cifar", checkpoint=path, preset="pytorch_cifar")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x), rtol=0, atol=0)


def test_old_checkpoint_without_num_batches_tracked(tmp_path):
    src = CLASSIFIERS.build("resnet18_cifar", random_init=True)
    sd = {k: v for k, v in src.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = CLASSIFIERS.build("resnet18_cifar", checkpoint=_save(sd, tmp_path / "old.pth"))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def test_wrong_keys_name_file_and_keys(tmp_path):
    src = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, random_init=True)
    sd = src.net.state_dict()
    sd["fc.kernel"] = sd.pop("fc.weight")
    path = _save(sd, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError) as err:
        CLASSIFIERS.build("wideresnet", checkpoint=path, depth=10, widen_factor=1)
    assert path in str(err.value) and "fc.weight" in str(err.value) and "fc.kernel" in str(err.value)

    # a Hill/ADP (meliketoy) file with the default preset: named layout mismatch and a hint
    mk = CLASSIFIERS.build("wideresnet", depth=10, widen_factor=1, preset="hill", random_init=True)
    path = _save(mk.net.state_dict(), tmp_path / "clf.pth")
    with pytest.raises(CheckpointError, match="meliketoy layout") as err:
        CLASSIFIERS.build("wideresnet", checkpoint=path, depth=10, widen_factor=1)
    assert path in str(err.value) and "preset hill or adp" in str(err.value)

    # depth mismatch: WRN-16 file into WRN-10
    deeper = CLASSIFIERS.build("wideresnet", depth=16, widen_factor=1, random_init=True)
    path = _save(deeper.net.state_dict(), tmp_path / "wrn16.pt")
    with pytest.raises(CheckpointError, match="WRN-16-1"):
        CLASSIFIERS.build("wideresnet", checkpoint=path, depth=10, widen_factor=1)

    # shape mismatch (num_classes) names the file
    path = _save(src.net.state_dict(), tmp_path / "ten.pt")
    with pytest.raises(CheckpointError, match="ten.pt"):
        CLASSIFIERS.build("wideresnet", checkpoint=path, depth=10, widen_factor=1, num_classes=100)

    # ImageNet file into the CIFAR-stem builder
    r18 = resnet.ResNet(18, 10, "imagenet")
    path = _save(r18.state_dict(), tmp_path / "r18in.pt")
    with pytest.raises(CheckpointError, match="7×7"):
        CLASSIFIERS.build("resnet18_cifar", checkpoint=path)


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CLASSIFIERS.build("wrn28_10", checkpoint=str(tmp_path / "missing.pt"))
    path = _save({"optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="no state dict found") as err:
        CLASSIFIERS.build("resnet50", checkpoint=path)
    assert path in str(err.value)
    path = _save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        CLASSIFIERS.build("resnet50", checkpoint=path)
    # a whole pickled module (meliketoy / ADP checkpoint.t7) is refused by weights_only=True
    path = _save({"net": torch.nn.Linear(2, 2), "acc": 90.0}, tmp_path / "checkpoint.t7")
    with pytest.raises(CheckpointError, match="Re-save the weights"):
        CLASSIFIERS.build("wrn28_10", checkpoint=path, preset="adp")


def test_gradients_reach_the_input():
    for name, kw, shape in (("wideresnet", {"depth": 10, "widen_factor": 2}, (2, 3, 32, 32)),
                            ("wideresnet", {"depth": 10, "widen_factor": 2, "preset": "hill"}, (2, 3, 32, 32)),
                            ("resnet18_cifar", {}, (2, 3, 32, 32)),
                            ("resnet", {"depth": 18}, (1, 3, 64, 64))):
        m = CLASSIFIERS.build(name, random_init=True, **kw)
        x = torch.rand(*shape, requires_grad=True)
        F.cross_entropy(m(x), torch.zeros(shape[0], dtype=torch.long)).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert m.net.conv1.weight.grad is not None  # parameters get gradients too (eval-mode BN)
