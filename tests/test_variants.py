"""The HyperSeg paper's ablation variants: ResNet18 / PSPNet18 / PSPNet50 encoders, static decoder
convolutions (``dynamic=False``), the weight-grid and positional-encoding switches, their bad inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyseg.data.synthetic import render_sample
from pyseg.losses import CrossEntropy
from pyseg.models import create_model, get_config
from pyseg.models.encoders import PSPEncoder, PyramidPooling
from pyseg.models.hyperseg import _level_input

VARIANTS = ["hyperseg-s-camvid-resnet18", "hyperseg-l-camvid-resnet18", "hyperseg-s-camvid-psp18",
            "hyperseg-l-camvid-psp18", "hyperseg-s-camvid-psp50", "hyperseg-l-camvid-psp50",
            "hyperseg-s-camvid-static", "hyperseg-l-camvid-static"]

# parameters of pyseg's builds (all, trainable); the paper's counts are in the configs (paper_params)
EXPECTED = {
    "hyperseg-s-camvid-resnet18": (15_434_168, 15_434_168),
    "hyperseg-l-camvid-resnet18": (16_264_320, 16_264_320),
    "hyperseg-s-camvid-psp18": (16_858_040, 16_858_040),
    "hyperseg-l-camvid-psp18": (17_036_160, 17_036_160),
    "hyperseg-s-camvid-psp50": (56_577_112, 56_577_112),
    "hyperseg-l-camvid-psp50": (68_811_456, 68_811_456),
    "hyperseg-s-camvid-static": (9_837_276, 6_144_476),
    "hyperseg-l-camvid-static": (9_839_416, 6_146_616),
}


def _count(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_matches_paper(name):
    model = _meta_model(name)
    total, trainable = _count(model), _count(model, trainable=True)
    assert (total, trainable) == EXPECTED[name]
    paper = get_config(name)["paper_params"]
    assert abs(total / paper - 1) < 0.05, (name, total, paper)


@pytest.mark.parametrize("size", ["s", "l"])
def test_static_count_is_dynamic_minus_weight_mapper_plus_static_weights(size):
    dyn = _meta_model(f"hyperseg-{size}-camvid")
    static = _meta_model(f"hyperseg-{size}-camvid-static")
    numel = sum(b.weight_numel for b in dyn.decoder)
    assert [b.weight_numel for b in static.decoder] == [b.weight_numel for b in dyn.decoder]  # same shapes
    assert _count(static) == _count(dyn) - _count(dyn.weight_mapper) + numel
    assert _count(static.weight_mapper) == numel
    frozen = _count(static.context_head) + _count(static.encoder.trunk.conv_head) + _count(static.encoder.trunk.bn2)
    assert _count(static, trainable=True) == _count(static) - frozen


def _generated_batch(n=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    imgs, labels = zip(*(render_sample(rng, size, size) for _ in range(n)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.stack(labels)).long()


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_one_step_on_generated_data(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).train()
    x, y = _generated_batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.999))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    logits = model(x)
    assert logits.shape == (2, 4, 64, 64)
    loss = CrossEntropy()(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad  # every trainable parameter reaches the loss
    opt.step()
    for k, p in model.named_parameters():
        changed = not torch.equal(before[k], p.detach())
        # (timm's ResNets zero-init each block's last BN scale, so the convs before it get zero
        # gradients on the first step)
        assert changed == bool(p.requires_grad and p.grad.abs().sum() > 0), k
    changed = {k.split(".")[0] for k, p in model.named_parameters() if not torch.equal(before[k], p.detach())}
    assert changed == ({"encoder", "decoder", "weight_mapper"} | ({"context_head"} if model.dynamic else set()))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 4, 64, 64) and torch.isfinite(out).all()


def test_static_decoder_is_an_ordinary_convolution_and_ignores_phi():
    torch.manual_seed(0)
    model = create_model("hyperseg-s-camvid-static", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 128)
    feats, weights, phi = model.generate_weights(x)
    assert phi is None and all(w.shape[-2:] == (1, 1) for w in weights)
    assert torch.equal(weights[0][0], weights[0][1])  # one kernel for every sample (and patch)
    with torch.no_grad():
        ref = model(x)
        for p in model.context_head.parameters():
            p.add_(1.0)  # the context head is not run: the output cannot change
        assert torch.equal(model(x), ref)
        # level 0 (a 1x1 level): relu(bn(conv2d(level input, the static kernel)))
        block = model.decoder[0]
        inp = _level_input(feats[-1], None)
        w = weights[0][0].view(block.out_channels, block.in_channels, 1, 1)
        expected = F.relu(F.batch_norm(F.conv2d(inp, w), block.bn.running_mean, block.bn.running_var,
                                       block.bn.weight, block.bn.bias, eps=block.bn.eps))
        torch.testing.assert_close(block(inp, weights[0]), expected, rtol=1e-4, atol=1e-5)


def test_grid_resamples_phi_and_weights_pool_accordingly():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 256)  # phi: 4 x 8
    base = create_model("hyperseg-tiny").eval()
    state = base.state_dict()
    _, w_full, phi = base.generate_weights(x)
    assert phi.shape[-2:] == (4, 8)
    for grid in [(1, 1), (2, 4), (3, 5)]:
        model = create_model("hyperseg-tiny", grid=grid).eval()
        model.load_state_dict(state)  # the grid adds no parameters
        _, w, _ = model.generate_weights(x)
        for wf, wg in zip(w_full, w):
            assert wg.shape[-2:] == grid
            # the weight mapper is a bias-free 1x1 conv: pooling phi == pooling the weights
            torch.testing.assert_close(wg, F.adaptive_avg_pool2d(wf, grid), rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            assert model(x).shape == (1, 4, 128, 256)
        assert model.weight_grid(128, 256) == grid
    # and it trains (the pooling is differentiable)
    model = create_model("hyperseg-tiny", grid=(1, 1)).train()
    model(torch.randn(2, 3, 128, 128)).mean().backward()


def test_positional_encoding_off_drops_the_coordinate_channels():
    on = _meta_model("hyperseg-s-camvid")
    off = _meta_model("hyperseg-s-camvid", positional_encoding=False)
    assert [b.in_channels for b in off.decoder] == [b.in_channels - 2 for b in on.decoder]
    assert _count(off) < _count(on)
    skip, prev = torch.randn(2, 5, 8, 8), torch.randn(2, 3, 4, 4)
    up = F.interpolate(prev, size=(8, 8), mode="bilinear", align_corners=False)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            s = skip.clone().requires_grad_(grad)
            torch.testing.assert_close(_level_input(s, prev, coords=False), torch.cat([s, up], 1))
            assert _level_input(s, prev).shape[1] == 2 + 5 + 3
    model = create_model("hyperseg-tiny", positional_encoding=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 4, 64, 128)


def test_pspnet_encoder_strides_and_pyramid_pooling():
    enc = PSPEncoder("pspnet18", out_feat_scale=1.0).eval()
    with torch.no_grad():
        feats, signal = enc(torch.randn(1, 3, 64, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 64), (64, 16, 32), (128, 8, 16), (256, 4, 8),
                                                   (512, 2, 4)]
    assert tuple(signal.shape[1:]) == (512, 2, 4) and enc.signal_channels == 512
    ppm = PyramidPooling(8, 6)
    assert ppm.bins == (1, 2, 3, 6) and ppm.fusion[0].in_channels == 16 and ppm.fusion[0].kernel_size == (3, 3)
    assert ppm(torch.randn(2, 8, 7, 9)).shape == (2, 6, 7, 9)


@pytest.mark.parametrize("grid", [(0, 2), (2,), "4x4", (2.0, 2), (True, 2)])
def test_bad_grid_values(grid):
    with pytest.raises(ValueError, match="grid must be None or a pair of positive ints"):
        _meta_model("hyperseg-tiny", grid=grid)


def test_grid_that_does_not_fit_the_decoder():
    model = create_model("hyperseg-tiny", grid=(4, 4)).eval()
    with pytest.raises(ValueError, match=r"grid 4x4 does not fit the decoder at input 64x128.*2x4"):
        model(torch.randn(1, 3, 64, 128))
    with pytest.raises(ValueError, match="grid has no effect with dynamic=False"):
        _meta_model("hyperseg-s-camvid-static", grid=(2, 2))


def test_unknown_encoder_and_bad_switches():
    with pytest.raises(ValueError, match=r"unknown encoder backbone 'pspnet34'"):
        _meta_model("hyperseg-s-camvid", backbone="pspnet34")
    with pytest.raises(ValueError, match="positional_encoding must be True or False"):
        _meta_model("hyperseg-s-camvid", positional_encoding="no")
    with pytest.raises(ValueError, match="dynamic must be True or False"):
        _meta_model("hyperseg-s-camvid", dynamic=0)
    with pytest.raises(ValueError, match="signal_channels must be an integer >= 2"):
        _meta_model("hyperseg-s-camvid-resnet18", signal_channels=0)
