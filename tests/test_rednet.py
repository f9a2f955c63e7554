"""pipeline.purifiers.nets.rednet: REDNet, the denoiser of APuDAE's published setting."""
from __future__ import annotations

import pytest
import torch

from pipeline.purifiers.nets import rednet


def test_rednet30_layout():
    net = rednet.make()
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in net.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == 15 and len(deconvs) == 15
    assert all(m.out_channels == 64 and m.kernel_size == (3, 3) for m in convs)
    assert convs[0].stride == (2, 2) and all(m.stride == (1, 1) for m in convs[1:])
    assert deconvs[-1].stride == (2, 2) and deconvs[-1].out_channels == 3
    # encoder layers 1, 3, …, 13 feed decoder layers 12, 10, …, 0
    assert net._skip_from == {12: 1, 10: 3, 8: 5, 6: 7, 4: 9, 2: 11, 0: 13}


def test_rednet_small_forward_and_residual():
    torch.manual_seed(0)
    net = rednet.make(in_channels=3, num_layers=3, num_features=8).eval()
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert out.shape == x.shape and out.min() >= 0
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    assert torch.equal(net(x), x)          # zero network: the global residual alone
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 31, 31))


def test_rednet_names_the_divisor_it_takes():
    from pipeline.purifiers.nets import InputSizeError

    with pytest.raises(InputSizeError, match="rednet30 needs height and width divisible by 2"):
        rednet.make(1, 3, 4)(torch.zeros(2, 1, 7, 8))
