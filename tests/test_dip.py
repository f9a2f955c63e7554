"""Deep Image Prior defense: boundary analysis pieces, contract, determinism, batching."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.classifiers import small_cnn
from pipeline.io import checkpoints, datasets
from pipeline.purifiers.dip import (
    DIPPurifier,
    DIPSettings,
    DIPTrace,
    find_crossing,
    find_last_switch,
    localize_boundary,
    push_away,
)
from pipeline.purifiers.nets.dip_nets import StackedSkipNet, group_conv
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

TINY = dict(iterations=24, check_every=3, warmup=6, code_channels=4, down=(8, 8), skip=2,
            bisect_steps=6)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    images, _ = datasets.load_digits()
    return datasets.to_float_nchw(images[:6])


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn.make(1, 10, 8).eval().requires_grad_(False)


def keyed(n: int, context: str = "dip-test", offset: int = 0) -> Noise:
    return Noise.for_batch(0, [f"s{i + offset}" for i in range(n)], context)


class TwoPixelLinear(nn.Module):
    """Images of 2 pixels; class 1 iff w·x > c (logits [0, w·x − c])."""

    def __init__(self, w=(1.0, 2.0), c=1.5):
        super().__init__()
        self.w = torch.tensor(w)
        self.c = c

    def forward(self, x):
        s = x.flatten(1) @ self.w - self.c
        return torch.stack([torch.zeros_like(s), s], 1)


class MeanThreshold(nn.Module):
    """Class 1 iff the mean intensity is below c: digits (mean ≈ 0.3) are class 1, while the
    early DIP reconstructions (grey, mean ≈ 0.5) are class 0, so every trajectory crosses."""

    def __init__(self, c=0.4):
        super().__init__()
        self.c = c

    def forward(self, x):
        s = self.c - x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(s), 10 * s], 1)


# ---------------------------------------------------------------- boundary analysis

def test_find_crossing_cases():
    y_adv = torch.tensor([1, 1, 1, 1, 1, 1])
    per_row = [
        [9, 0, 0, 0, 1, 1],   # early label 0, last 0 at record 3 → crossing 3
        [9, 1, 1, 1, 1, 1],   # early label is the input's own (clean input): none
        [9, 0, 0, 0, 0, 0],   # never leaves the early label: none
        [9, 0, 1, 0, 1, 1],   # flickers: the last record labelled 0 counts → 3
        [9, 0, 0, 2, 2, 1],   # leaves through a third class: crossing 2
        [9, 2, 0, 0, 1, 1],   # early window (records 1–2) tie 0/2 → smallest label 0 → 3
    ]
    preds = torch.tensor(per_row).T                       # [K=6, N=6]; record 0 is warm-up
    j, y_early = find_crossing(preds, y_adv, first=1, early_end=3, num_classes=10)
    assert y_early.tolist() == [0, 1, 0, 0, 0, 0]
    assert j.tolist() == [3, -1, -1, 3, 2, 3]
    j_all, y_all = find_crossing(preds, y_adv, first=0, early_end=1, num_classes=10)
    assert y_all.tolist() == [9] * 6 and j_all.tolist() == [0] * 6   # warm-up label 9 left at once


def test_find_last_switch_cases():
    y_adv = torch.tensor([1, 1, 1, 1])
    preds = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]]).T
    assert find_last_switch(preds, y_adv, first=0).tolist() == [1, -1, 2, -1]
    assert find_last_switch(preds, y_adv, first=2).tolist() == [-1, -1, 2, -1]


def test_localize_boundary_on_linear_classifier():
    clf = TwoPixelLinear()
    a = torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.5, 0.1]])      # w·a − c < 0: class 0
    b = torch.tensor([[0.9, 0.8], [1.0, 1.0], [0.6, 0.9]])      # w·b − c > 0: class 1
    y_ref = torch.zeros(3, dtype=torch.long)
    steps = 12
    alpha, x_on = localize_boundary(clf, a, b, y_ref, steps)
    w, c = clf.w, clf.c
    alpha_star = (c - a @ w) / ((b - a) @ w)
    assert torch.all((alpha - alpha_star).abs() <= 2.0 ** -steps + 1e-6)
    assert torch.all(alpha <= alpha_star + 1e-6)                # inside y_ref's region
    assert torch.all(clf(x_on).argmax(1) == 0)
    assert torch.allclose(x_on @ w, torch.full((3,), c), atol=4 * 2.0 ** -steps)
    # the same boundary seen from the other side
    alpha_b, _ = localize_boundary(clf, b, a, torch.ones(3, dtype=torch.long), steps)
    assert torch.all(((1 - alpha_b) - alpha_star).abs() <= 2.0 ** -steps + 1e-6)


def test_push_away_moves_against_adversarial_direction():
    x_on = torch.tensor([[0.4, 0.4]])
    x_adv = torch.tensor([[0.6, 0.5]])
    pushed = push_away(x_on, x_adv, 0.5)
    assert torch.allclose(pushed, torch.tensor([[0.3, 0.35]]))
    clf = TwoPixelLinear(c=1.25)        # w·x_on = 1.2, w·x_adv = 1.6: boundary in between
    assert clf(x_on).argmax(1).item() == 0 and clf(x_adv).argmax(1).item() == 1
    assert (clf(pushed)[:, 1] < clf(x_on)[:, 1]).all()          # further onto the clean side


def test_purify_trace_on_constructed_trajectory():
    """A trace whose crossing and boundary we know: check detection, bisection and stitching."""
    clf = TwoPixelLinear(w=(1.0, 1.0), c=1.0)
    d = DIPPurifier(clf, DIPSettings(warmup=1, early_window=2, check_every=1, bisect_steps=10, push=1.0,
                                     stitch_window=1, code_channels=1, down=(1,), skip=0, pad_mode="zeros"))
    x = torch.tensor([[0.9, 0.9], [0.1, 0.1], [0.8, 0.8]]).view(3, 1, 1, 2)  # labels 1, 0, 1
    # row 0: sums 0.2 (warm-up), 0.6, 0.6, 1.4, 1.8 → early label 0, crossing between records
    # 2 and 3 (sum 1.0 at α = .5). Row 1: a clean input, early label = its label. Row 2:
    # early label 0 but the trajectory never leaves it.
    r0 = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.3, 0.3], [0.7, 0.7], [0.9, 0.9]])
    r1 = torch.tensor([[0.2, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.12, 0.1]])
    r2 = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4], [0.45, 0.45]])
    iterates = torch.stack([r0, r1, r2], 1).view(5, 3, 1, 1, 2)
    logits = torch.stack([clf(iterates[k].flatten(1)) for k in range(5)])
    trace = DIPTrace(iterates, torch.arange(1, 6), logits)
    out, _, stats = d.purify_trace(x, trace)
    x_on = torch.tensor([0.5, 0.5])
    expected0 = (push_away(x_on, torch.tensor([0.9, 0.9]), 1.0) + r0[2]) / 2
    assert stats["crossed"].tolist() == [True, False, False]
    assert stats["y_early"].tolist() == [0, 0, 0]
    assert abs(stats["alpha"][0].item() - 0.5) <= 2 ** -10
    assert stats["crossing_step"].tolist() == [3, -1, -1]
    assert torch.allclose(out[0].flatten(), expected0, atol=1e-3)
    assert torch.equal(out[1].flatten(), r1[-1])               # no crossing: last reconstruction
    assert torch.equal(out[2].flatten(), r2[-1])
    assert clf(out[0].view(1, 2)).argmax(1).item() == 0
    d.settings = d.settings.replace({"fallback": "input"})
    assert torch.equal(d.purify_trace(x, trace).images[1:], x[1:])


# ---------------------------------------------------------------- networks

def test_group_conv_matches_per_row_conv():
    torch.manual_seed(1)
    h = torch.rand(3, 2, 6, 6)
    w = torch.randn(3, 4, 2, 3, 3)
    b = torch.randn(3, 4)
    out = group_conv(h, w, b, stride=2, pad_mode="zeros")
    for i in range(3):
        ref = torch.nn.functional.conv2d(h[i:i + 1], w[i], b[i], stride=2, padding=1)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)


def test_stacked_init_is_keyed_and_scaled():
    net = StackedSkipNet(4, 1, down=(8, 8), skip=2)
    p1 = net.init_params(keyed(2))
    p2 = net.init_params(keyed(2))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    w = p1["l0.down1.w"]
    bound = 1 / math.sqrt(4 * 9)
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert not torch.equal(w[0], w[1])                       # rows get their own networks
    single = net.init_params(keyed(1, offset=1))
    assert torch.equal(single["l0.down1.w"][0], w[1])        # a row's init depends on its key only


# ---------------------------------------------------------------- purifier contract

def test_contract_shape_range_flags(digits, classifier):
    d = DIPPurifier(classifier, DIPSettings(**TINY))
    assert d.flags() == {"stochastic": True, "differentiable": False, "test_time_optimization": True}
    out, nfe, stats = d.purify(digits[:3], keyed(3))
    assert out.shape == digits[:3].shape
    assert out.min() >= 0 and out.max() <= 1
    assert nfe > TINY["iterations"]
    assert set(d.record()) >= {"iterations", "lr", "warmup", "early_window", "push",
                               "stitch_window", "detection", "down"}
    assert set(stats) == {"crossed", "crossing_step", "alpha", "y_input", "y_early"}
    assert all(v.shape == (3,) for v in stats.values())


def test_deterministic_for_same_keys(digits, classifier):
    d = DIPPurifier(classifier, DIPSettings(**TINY))
    n1, n2 = keyed(3), keyed(3)
    t1, t2 = d.fit(digits[:3], n1), d.fit(digits[:3], n2)
    assert torch.equal(t1.iterates, t2.iterates) and torch.equal(t1.logits, t2.logits)
    assert torch.equal(d(digits[:3], n1), d(digits[:3], n2))
    other = d(digits[:3], keyed(3, context="other"))
    assert not torch.equal(other, d(digits[:3], n1))


@pytest.mark.parametrize("which", ["threshold", "cnn"])
def test_batched_equals_per_image(digits, classifier, which):
    clf = MeanThreshold() if which == "threshold" else classifier
    d = DIPPurifier(clf, DIPSettings(**{**TINY, "early_window": 6}))
    x = digits[:4]
    noise = keyed(4)
    batched, _, stats = d.purify(x, noise)
    if which == "threshold":                    # the crossing path (bisection, push, stitch) ran
        assert stats["crossed"].sum() >= 2
    for i in range(4):
        single = d(x[i:i + 1], noise.select(slice(i, i + 1)))
        torch.testing.assert_close(single, batched[i:i + 1], rtol=0, atol=0)
    pair = d(x[[3, 1]], noise.select(torch.tensor([3, 1])))
    torch.testing.assert_close(pair, batched[[3, 1]], rtol=0, atol=0)
    d.settings = d.settings.replace({"chunk_rows": 3})  # chunks of 3 + 1 rows: the same result
    chunked = d.purify(x, noise)
    torch.testing.assert_close(chunked.images, batched, rtol=0, atol=0)
    assert all(torch.equal(chunked.stats[k], stats[k]) for k in ("crossed", "y_input", "crossing_step"))


def test_straight_through_gradient(digits, classifier):
    d = DIPPurifier(classifier, DIPSettings(**{**TINY, "iterations": 6, "warmup": 0}))
    x = digits[:2].clone().requires_grad_(True)
    d(x, keyed(2)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_builder_loads_classifier(tmp_path, classifier, digits):
    ckpt = str(tmp_path / "cnn.pt")
    checkpoints.save(ckpt, small_cnn.ARCH, {"in_channels": 1, "num_classes": 10, "width": 8},
                     classifier.state_dict())
    d = PURIFIERS.build("dip", classifier_checkpoint=ckpt, iterations=6, check_every=2, warmup=0,
                        down=[8, 8], skip=2, code_channels=4)
    assert isinstance(d, DIPPurifier)
    assert not any(p.requires_grad for p in d.classifier.parameters())
    out = d(digits[:2], keyed(2))
    assert out.shape == digits[:2].shape
    assert d.record()["classifier_checkpoint"] == ckpt
