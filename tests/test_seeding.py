import torch

from pipeline.seeding import Noise, _i32, _mix32


def mix32_reference(x: int) -> int:
    """Pure-Python lowbias32 (Wellons' hash-prospector constants), the specification `_mix32`
    is tested against."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_pure_python_reference():
    values = [0, 1, 2, 255, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789]
    got = _mix32(torch.tensor([_i32(v) for v in values], dtype=torch.int32))
    assert [int(g) & 0xFFFFFFFF for g in got] == [mix32_reference(v) for v in values]


def test_row_noise_independent_of_batch_composition():
    a = Noise.for_batch(7, ["k1", "k2", "k3"], "ctx", replicas=3)
    b = Noise.for_batch(7, ["k9", "k3"], "ctx", replicas=3)
    za = a.normal((1, 5, 5), "p", step=4)
    zb = b.normal((1, 5, 5), "p", step=4)
    assert torch.equal(za[6:9], zb[3:6])
    assert not torch.equal(za[0], za[1])          # replicas differ
    assert not torch.equal(za[6], a.normal((1, 5, 5), "p", step=5)[6])   # steps differ
    assert not torch.equal(za[6], a.normal((1, 5, 5), "q", step=4)[6])   # purposes differ


def test_seed_and_context_change_the_draws():
    z = Noise.for_batch(0, ["k"], "c").uniform((100,), "p")
    assert not torch.equal(z, Noise.for_batch(1, ["k"], "c").uniform((100,), "p"))
    assert not torch.equal(z, Noise.for_batch(0, ["k"], "d").uniform((100,), "p"))


def test_distributions():
    n = Noise.for_batch(0, [str(i) for i in range(200)], "stats")
    z = n.normal((50, 50), "z")
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z ** 4).mean().item() - 3) < 0.05          # Gaussian kurtosis
    u = n.uniform((50, 50), "u", low=-2, high=3)
    assert u.min() > -2 and u.max() < 3 and abs(u.mean().item() - 0.5) < 0.02
    r = n.randint((1000,), "r", high=7)
    counts = torch.bincount(r.flatten(), minlength=7).float()
    assert counts.min() / counts.max() > 0.95
    flat = z.reshape(200, -1)
    corr = torch.corrcoef(flat[:40]).fill_diagonal_(0).abs().max()
    assert corr < 0.1


def test_select_and_repeat_are_consistent():
    n = Noise.for_batch(3, ["a", "b"], "ctx")
    rep = n.repeat(4)
    assert rep.rows == 8
    assert torch.equal(rep.select(slice(4, 8)).normal((3,), "p"), n.select(slice(1, 2)).repeat(4).normal((3,), "p"))
    assert len({tuple(r) for r in rep.row_keys.tolist()}) == 8
