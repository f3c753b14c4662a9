"""Inference rewrites of the static trunk (pyseg.models._fuse): conv + activation, squeeze-excitation
folding, and HyperSeg.fuse() as a whole."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyseg.models import create_model
from pyseg.models._fuse import ConvAct2d, PwDwConv2d, SEGatedConv2d, _onednn_conv, fold_se_gates

ACTS = [nn.SiLU(inplace=True), nn.ReLU(), nn.ReLU6(inplace=True), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(),
        nn.GELU()]  # GELU: no oneDNN post-op mapped -> always conv then act


def _count_calls(module):
    """Wrap module._op (the oneDNN convolution) to count how often it runs."""
    calls = []
    op = module._op
    if op is not None:
        def counted(*a):
            calls.append(1)
            return op(*a)
        module._op = counted
    return calls


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("conv_kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1,
                                                                          groups=6, bias=False),
                                     dict(kernel_size=1), dict(kernel_size=2, stride=2, dilation=1)],
                         ids=["3x3", "dw-s2", "1x1", "2x2-s2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_act_matches_conv_then_act(act, conv_kw, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12 if conv_kw.get("groups", 1) == 1 else 6, **conv_kw)
    fused = ConvAct2d(copy.deepcopy(conv), copy.deepcopy(act))
    x = torch.randn(2, 6, 13, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
    calls = _count_calls(fused)
    expected = type(act)()(F.conv2d(x.double(), conv.weight.double(),
                                    None if conv.bias is None else conv.bias.double(), conv.stride, conv.padding,
                                    conv.dilation, conv.groups))
    with torch.inference_mode():
        got = fused(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    mapped = not isinstance(act, nn.GELU) and _onednn_conv() is not None
    assert len(calls) == (1 if mapped else 0)  # the fused path ran where it exists


@pytest.mark.parametrize("act", ACTS[:3], ids=lambda a: type(a).__name__)
def test_conv_act_autograd(act):
    """Under autograd it runs conv then act (oneDNN's op has no derivative): float64 gradcheck, and a
    float32 backward that matches the unfused module's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    fused = ConvAct2d(copy.deepcopy(conv), copy.deepcopy(act))
    calls = _count_calls(fused)
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    fused(x).square().sum().backward()
    x2 = x.detach().requires_grad_()
    type(act)()(conv(x2)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(fused.conv.weight.grad, conv.weight.grad)
    assert not calls
    f64 = copy.deepcopy(fused).double()
    assert torch.autograd.gradcheck(f64, (torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True),))


def test_conv_act_rejects_non_plain_conv():
    with pytest.raises(TypeError, match="plain nn.Conv2d"):
        ConvAct2d(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())


@torch.no_grad()
def _pw_dw(cin, hid, dw_kw, act=nn.SiLU):
    torch.manual_seed(cin + hid)
    pw = ConvAct2d(nn.Conv2d(cin, hid, 1), act())
    dw = ConvAct2d(nn.Conv2d(hid, hid, groups=hid, **dw_kw), act())
    for c in (pw.conv, dw.conv):
        nn.init.normal_(c.bias)
    return PwDwConv2d(pw, dw).eval()


DW_CASES = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
            dict(kernel_size=5, stride=2, padding=2), dict(kernel_size=3, padding=2, dilation=2),
            dict(kernel_size=3, stride=2, padding=0), dict(kernel_size=3, padding=3)]


@pytest.mark.skipif(_onednn_conv() is None, reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dw_kw", DW_CASES, ids=["3x3", "3x3-s2", "5x5-s2", "3x3-d2", "3x3-s2-p0", "3x3-p3"])
@pytest.mark.parametrize("size", [(13, 17), (16, 9), (3, 5)])
@pytest.mark.parametrize("band_bytes", [1, 3000, 1 << 30], ids=["1row", "some-rows", "one-band"])
def test_pw_dw_bands_match_sequential(dw_kw, size, band_bytes):
    """Banded expansion + depthwise equals the two convolutions run one after the other: every band
    height (1 output row, several, one band), stride 1 and 2, odd sizes, padding only at the image's
    top/bottom (none; more than the kernel, so that some bands read padding only), batch 2."""
    m = _pw_dw(5, 12, dw_kw)
    m.min_bytes, m.band_bytes = 0, band_bytes
    x = torch.randn(2, 5, *size).contiguous(memory_format=torch.channels_last)
    calls = _count_calls(m.pw)
    with torch.inference_mode():
        expected = m.dw(m.pw(x))
        n_seq = len(calls)
        got = m(x)
    assert len(calls) > n_seq  # the banded path ran
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    ref = F.silu(F.conv2d(F.silu(F.conv2d(x.double(), m.pw.conv.weight.double(), m.pw.conv.bias.double())),
                          m.dw.conv.weight.double(), m.dw.conv.bias.double(), groups=12, **{
                              k: v for k, v in dw_kw.items() if k != "kernel_size"}))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_onednn_conv() is None, reason="no oneDNN in this torch build")
def test_pw_dw_runs_sequentially_elsewhere():
    """Small maps, NCHW inputs and autograd run the two convolutions as they are (and stay trainable)."""
    m = _pw_dw(4, 8, dict(kernel_size=3, stride=2, padding=1))
    x = torch.randn(1, 4, 11, 10)
    calls = _count_calls(m.pw)
    with torch.inference_mode():
        m(x.contiguous(memory_format=torch.channels_last))  # below min_bytes: one call of each conv
        assert len(calls) == 1
        m.min_bytes = 0
        m(x)  # NCHW: no bands
        assert len(calls) == 2
    m.min_bytes, m.band_bytes = 0, 1
    xr = x.double().requires_grad_()
    m.double()
    y = m(xr)
    y.sum().backward()
    assert xr.grad is not None and m.pw.conv.weight.grad is not None
    assert torch.autograd.gradcheck(lambda t: m(t), (xr[:, :, :5, :6].detach().requires_grad_(),))
    with pytest.raises(TypeError, match="PwDwConv2d"):
        PwDwConv2d(m.dw, m.pw)


def _randomize_bn(model, seed):
    """Non-trivial running statistics, so that folding is checked against real BatchNorms."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _se_block(stride=1, cin=8, mid=24, cout=8):
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    return _randomize_bn(InvertedResidual(cin, cout, dw_kernel_size=3, stride=stride, exp_ratio=mid / cin,
                                          act_layer=nn.SiLU, se_layer=SqueezeExcite).eval(), 3)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_se_gate_folding_matches_block(batch, channels_last):
    torch.manual_seed(0)
    blk = _se_block()
    x = torch.randn(batch, 8, 11, 14)
    with torch.no_grad():
        expected = blk.double()(x.double())
        blk.float()
    fused = copy.deepcopy(blk)
    assert fold_se_gates(fused, x) == 1
    assert isinstance(fused.se, nn.Identity) and isinstance(fused.conv_pwl, SEGatedConv2d)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = fused(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # differentiable (float64 gradcheck through the per-sample weight scaling)
    f64 = copy.deepcopy(fused).double()
    xs = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f64, (xs,))


def test_se_gate_folding_restores_on_mismatch(monkeypatch):
    blk = _se_block()
    x = torch.randn(1, 8, 9, 9)
    se, proj = blk.se, blk.conv_pwl
    monkeypatch.setattr(SEGatedConv2d, "forward", lambda self, t: self.conv(t) + 1.0)
    with pytest.raises(RuntimeError, match="restored"):
        fold_se_gates(blk, x)
    assert blk.se is se and blk.conv_pwl is proj


def test_se_gate_folding_skips_other_modules():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert fold_se_gates(seq, torch.randn(1, 3, 4, 4)) == 0
    with pytest.raises(TypeError, match="1x1"):
        SEGatedConv2d(nn.Identity(), nn.Conv2d(4, 4, 3))


def _randomized(name):
    torch.manual_seed(0)
    return _randomize_bn(create_model(name).eval(), 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_hyperseg_fuse_rewrites_trunk_and_keeps_outputs(channels_last):
    m = _randomized("hyperseg-m")
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        expected = m(x)
    plain = copy.deepcopy(m).fuse(activations=False, squeeze_excitation=False)
    assert not any(isinstance(t, (ConvAct2d, SEGatedConv2d)) for t in plain.modules())
    fused = copy.deepcopy(m).fuse()
    n_act = sum(isinstance(t, ConvAct2d) for t in fused.modules())
    n_se = sum(isinstance(t, SEGatedConv2d) for t in fused.modules())
    assert n_se == 23  # every MBConv / DS block of EfficientNet-B1
    assert n_act == 1 + 2 * 1 + 21 * 2 + 1  # stem, 2 DS blocks (depthwise), 21 MBConv (expansion + depthwise), head
    assert sum(isinstance(t, PwDwConv2d) for t in fused.modules()) == 21  # every MBConv's expansion + depthwise
    assert not any(isinstance(t, PwDwConv2d) for t in copy.deepcopy(m).fuse(bands=False).modules())
    if channels_last:
        fused.to_channels_last()
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        # random-init logits: tolerance relative to the largest value
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_hyperseg_fuse_other_backbone():
    """ReLU6 backbone (MobileNetV2): activation fusion applies, no squeeze-excitation to fold."""
    m = create_model("hyperseg-m", backbone="mobilenetv2_100", out_feat_scale=0.25).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        expected = m(x)
        m.fuse()
        assert any(isinstance(t, ConvAct2d) and isinstance(t.act, nn.ReLU6) for t in m.modules())
        assert not any(isinstance(t, SEGatedConv2d) for t in m.modules())
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("pads,k,stride,groups", [((0, 1, 0, 1), 3, 2, 6), ((1, 2, 1, 2), 5, 2, 6),
                                                  ((0, 1, 2, 0), 3, 1, 1), ((3, 0, 0, 2), 2, (1, 2), 2)])
@pytest.mark.parametrize("size", [(15, 22), (16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_absorb_zero_padding_matches_padded_conv(pads, k, stride, groups, size, channels_last):
    from pyseg.models._fuse import absorb_zero_padding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.ZeroPad2d(pads), nn.Conv2d(6, 12, k, stride, groups=groups)),
                          nn.ReLU()).eval()
    x = torch.randn(2, 6, *size)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        assert absorb_zero_padding(model, torch.randn(1, 6, 9, 11)) == 1
        conv = model[0]
        assert type(conv) is nn.Conv2d and not any(isinstance(m, nn.ZeroPad2d) for m in model.modules())
        left, right, top, bottom = pads
        assert conv.padding == (max(top, bottom), max(left, right))
        assert conv.kernel_size == (k + abs(top - bottom), k + abs(left - right))
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_absorb_zero_padding_leaves_others_and_restores(monkeypatch):
    from pyseg.models import _fuse

    dilated = nn.Sequential(nn.ZeroPad2d((0, 2, 0, 2)), nn.Conv2d(3, 3, 3, dilation=2))
    padded_twice = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 3, 3, padding=1))
    cropped = nn.Sequential(nn.ZeroPad2d((-1, 1, 0, 0)), nn.Conv2d(3, 3, 3))
    model = nn.Sequential(dilated, padded_twice, cropped).eval()
    assert _fuse.absorb_zero_padding(model, torch.randn(1, 3, 12, 12)) == 0
    assert model[0] is dilated and model[1] is padded_twice and model[2] is cropped

    model = nn.Sequential(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, 2))).eval()
    inner = model[0]
    wrong = lambda pad, conv: nn.Conv2d(3, 4, 3, 2, padding=1)  # noqa: E731 -- a different function
    monkeypatch.setattr(_fuse, "_absorbed", wrong)
    with pytest.raises(RuntimeError, match="restored"):
        _fuse.absorb_zero_padding(model, torch.randn(1, 3, 10, 10))
    assert model[0] is inner
