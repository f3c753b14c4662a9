"""HyperSeg models: registry, parameter counts, shapes, training, eval semantics, the weight mapper."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from pyseg.models import create_model, get_config, list_models
from pyseg import _extension
from pyseg.models.hyperseg import HyperSeg, _level_input, image_coordinates
from pyseg.ops._library import record_backends
from pyseg.models.weight_mapper import WeightMapper, divide_channels, signal_slices

NAMES = ["hyperseg-m", "hyperseg-s", "hyperseg-s-camvid", "hyperseg-l-camvid", "hyperseg-l-voc"]
# smallest legal inputs (H, W): multiples of 64 (v1_0 head, 2 levels) / 128 (VOC head, 3 levels)
SMALL = {"hyperseg-m": (64, 128), "hyperseg-s": (64, 128), "hyperseg-s-camvid": (64, 128),
         "hyperseg-l-camvid": (64, 128), "hyperseg-l-voc": (128, 128)}

# Trainable parameters of the public implementation (github YuvalNirkin/hyperseg), counted by building
# its models from the experiment configs: total, backbone (trunk + reducers), its WeightMapper module
# (= pyseg's context head), its decoder (signal2weights generators + decoder BN = pyseg's weight mapper
# + decoder).
PUBLIC_PARAMS = {
    "hyperseg-m": (10_311_214, 6_542_712, 3_280_640, 487_862),
    "hyperseg-s": (10_041_398, 6_558_032, 3_280_640, 202_726),
    "hyperseg-s-camvid": (9_949_064, 6_542_784, 3_280_640, 125_640),
    "hyperseg-l-camvid": (9_969_104, 6_542_784, 3_280_640, 145_680),
    "hyperseg-l-voc": (39_680_458, 10_739_008, 28_323_840 + 616_480, 1_130),
}

# Generator convs of the public implementation: (in_channels, out_channels, groups, phi offset, phi
# width). v1_0 (M, CamVid): every generator reads phi from channel 0 (overlapping prefixes);
# v1_0_unify (S): disjoint slices, levels 3-4 share one generator (868 + 2808 = 3676 weights padded
# to a multiple of 16); v0_1 (VOC): the head's out_conv, disjoint slices from the legacy division of
# the padded weight counts.
PUBLIC_GENERATORS = {
    "hyperseg-m": [(416, 5248, 32, 0, 416), (224, 3008, 16, 0, 224), (128, 704, 8, 0, 128),
                   (192, 2352, 16, 0, 192), (320, 4216, 4, 0, 320)],
    "hyperseg-s": [(576, 4160, 32, 0, 576), (128, 992, 16, 576, 128), (64, 208, 8, 704, 64),
                   (512, 3680, 16, 768, 512)],
    "hyperseg-s-camvid": [(448, 5248, 64, 0, 448), (256, 3008, 32, 0, 256), (256, 704, 32, 0, 256),
                          (192, 2352, 16, 0, 192), (128, 1896, 8, 0, 128)],
    "hyperseg-l-voc": [(592, 9408, 16, 0, 592), (272, 4496, 16, 592, 272), (416, 6624, 16, 864, 416),
                       (96, 1728, 16, 1280, 96), (48, 992, 16, 1376, 48), (112, 912, 16, 1424, 112)],
}


@functools.lru_cache(maxsize=None)
def _model(name, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw)


def _fresh(name, **kw):
    return copy.deepcopy(_model(name, **kw))


def _randomize_bn(model):
    """Non-trivial running statistics/affines so eval-mode checks are not against identity BNs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def _count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
def test_registry_lists_every_model():
    assert set(NAMES) <= set(list_models())
    for n in NAMES:
        cfg = get_config(n)
        assert cfg["public_params"] == PUBLIC_PARAMS[n][0]
    with pytest.raises(KeyError, match="unknown model"):
        create_model("hyperseg-xl")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_public(name):
    m = _model(name)
    total, backbone, head, decoder = PUBLIC_PARAMS[name]
    got = _count(m)
    print(f"{name}: total {got} (public {total}); encoder {_count(m.encoder)}, context head "
          f"{_count(m.context_head)}, weight mapper {_count(m.weight_mapper)}, decoder BN {_count(m.decoder)}")
    assert abs(got - total) <= 0.01 * total
    # per module (exact: timm's EfficientNet trunks have the same parameters as the public backbone).
    # Public v1_0 keeps the generators in its decoder; public v0_1 keeps them in its head (out_conv).
    assert _count(m.encoder) == backbone
    if name == "hyperseg-l-voc":
        assert (_count(m.context_head) + _count(m.weight_mapper), _count(m.decoder)) == (head, decoder)
    else:
        assert (_count(m.context_head), _count(m.weight_mapper) + _count(m.decoder)) == (head, decoder)
    assert got == total


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_eval(name):
    m = _model(name).eval()
    H, W = SMALL[name]
    x = torch.randn(1, 3, H, W)
    s = m.output_stride
    with torch.no_grad():
        logits, attn = m.forward_features_and_logits(x)
        y = m(x) if s > 1 else logits  # (stride-1 models: forward returns the decoder logits as they are)
    assert y.shape == (1, m.num_classes, H, W)
    assert torch.isfinite(y).all()
    assert logits.shape == (1, m.num_classes, H // s, W // s)
    assert attn.shape == (1, m.attn_channels, H // 4, W // 4)
    # the final output is the bilinear upsampling of the decoder logits
    ref = logits if s == 1 else F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, ref)
    # attention features begin with the positional embedding
    torch.testing.assert_close(attn[:, :2], image_coordinates(attn[:, 2:]))


def test_decoder_structure_hyperseg_m():
    """SPEC: decoder 82->64, 94->32, 44->16, 24->16 (hid 48), 34->19 (hid 68); grid 16x32 at 1024x512."""
    m = _model("hyperseg-m")
    io = [(b.in_channels, b.out_channels, b.kernel_size, b.hidden_channels) for b in m.decoder]
    assert io == [(82, 64, 1, 0), (94, 32, 1, 0), (44, 16, 1, 0), (24, 16, 3, 48), (34, 19, 3, 68)]
    assert [b.weight_numel for b in m.decoder] == [5248, 3008, 704, 2352, 4216]
    assert m.input_multiple == 64 and m.input_size == (512, 1024)
    with torch.no_grad():
        _, w, phi = m.eval().generate_weights(torch.randn(1, 3, 64, 128))
    assert phi.shape == (1, 1280, 2, 4)
    assert [tuple(t.shape) for t in w] == [(1, n, 2, 4) for n in [5248, 3008, 704, 2352, 4216]]


def test_image_coordinates():
    c = image_coordinates(torch.zeros(2, 5, 3, 4))
    assert c.shape == (2, 2, 3, 4)
    torch.testing.assert_close(c[0, 0, 1], torch.linspace(-1, 1, 4))  # channel 0 = x, along the width
    torch.testing.assert_close(c[1, 1, :, 2], torch.linspace(-1, 1, 3))  # channel 1 = y, along the height


@pytest.mark.parametrize("prev_size", [None, (5, 7), (9, 13)], ids=["first", "upsampled", "same-size"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_level_input_buffer_equals_concatenation(prev_size, channels_last):
    """Outside autograd the level input is written into one buffer; it equals cat(x, y, skip,
    resized previous output), the form autograd uses."""
    skip = torch.randn(2, 4, 9, 13)
    if channels_last:
        skip = skip.contiguous(memory_format=torch.channels_last)
    prev = None if prev_size is None else torch.randn(2, 3, *prev_size)
    parts = [image_coordinates(skip), skip]
    if prev is not None:
        parts.append(F.interpolate(prev, size=(9, 13), mode="bilinear", align_corners=False))
    want = torch.cat(parts, 1)
    with torch.no_grad():
        got = _level_input(skip, prev)
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # under autograd: the concatenation, and gradients reach the skip and the previous level
    s = skip.clone().requires_grad_()
    q = None if prev is None else prev.clone().requires_grad_()
    y = _level_input(s, q)
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=0)
    y.square().sum().backward()
    assert s.grad is not None and (q is None or q.grad is not None)


@pytest.mark.skipif(not _extension.has_kernel("hmsa_fuse", "CPU"),
                    reason="no compiled CPU hmsa_fuse: the final resize is F.interpolate itself")
def test_final_resize_matches_interpolate():
    """HyperSeg's final upsampling (the compiled single-scale hmsa_fuse on the CPU) equals F.interpolate."""
    m = _fresh("hyperseg-m").eval()
    logits = torch.randn(2, 19, 17, 33)
    with torch.no_grad(), record_backends() as ran:
        got = m._resize_logits(logits, (34, 66))
    assert ran == [("hmsa_fuse", "cpu")]  # the fast path ran
    torch.testing.assert_close(got, F.interpolate(logits, size=(34, 66), mode="bilinear", align_corners=False),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
def test_divide_channels_worked_example():
    assert divide_channels(1280, [5248, 3008, 704, 2352, 4216], 32) == [416, 224, 128, 192, 320]
    # HyperSeg-S (levels 3-4 unified), CamVid-S, VOC (padded counts): the public divisions
    assert divide_channels(1280, [4160, 992, 208, 3676], 32) == [576, 128, 64, 512]
    assert divide_channels(1280, [5248, 3008, 704, 2352, 1892], 64) == [448, 256, 256, 192, 128]
    assert divide_channels(1536, [9408, 4496, 6624, 1728, 992, 912], 16) == [592, 272, 416, 96, 48, 112]


@pytest.mark.parametrize("seed", range(20))
def test_divide_channels_properties(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 8, (1,), generator=g))
    unit = int(2 ** torch.randint(0, 6, (1,), generator=g))
    counts = torch.randint(1, 6000, (n,), generator=g).tolist()
    if seed % 3 == 0 and n > 1:
        counts[-1] = counts[0]  # equal counts share equally
    channels = unit * (n + int(torch.randint(0, 50, (1,), generator=g)))
    out = divide_channels(channels, counts, unit)
    smallest_group = counts.count(min(counts))
    assert channels - smallest_group * unit < sum(out) <= channels
    if len(set(counts)) == len(counts):
        assert sum(out) == channels
    assert all(c % unit == 0 and c >= unit for c in out)
    for i in range(n):
        for j in range(n):
            if counts[i] == counts[j]:
                assert out[i] == out[j]
    # every group except the smallest one gets at most its proportional share (floored, >= 1 unit)
    units, total = channels // unit, sum(counts)
    smallest = min(counts)
    for c, o in zip(counts, out):
        if c != smallest:
            assert o // unit <= max(1, int(units * c / total)) or counts.count(c) > 1


def test_divide_channels_errors():
    with pytest.raises(ValueError, match="multiple of unit"):
        divide_channels(100, [1, 2], 32)
    with pytest.raises(ValueError, match="fewer than"):
        divide_channels(64, [1, 2, 3], 32)
    with pytest.raises(ValueError, match="positive"):
        divide_channels(64, [0, 2], 32)


def test_signal_slices_layouts():
    assert signal_slices(1280, [5248, 3008, 704, 2352, 4216], 32, "disjoint") == [
        (0, 416), (416, 224), (640, 128), (768, 192), (960, 320)]
    assert signal_slices(1280, [5248, 3008, 704, 2352, 4216], 32, "prefix") == [
        (0, 416), (0, 224), (0, 128), (0, 192), (0, 320)]
    with pytest.raises(ValueError, match="slicing"):
        signal_slices(1280, [1], 32, "overlap")


def test_weight_mapper_unified_split():
    wm = WeightMapper(128, [40, 24, 30], weight_groups=[4, 8], unit=8, unify_from=1)
    assert len(wm.generators) == 2
    phi = torch.randn(2, 128, 3, 5)
    w = wm(phi)
    assert [tuple(t.shape) for t in w] == [(2, 40, 3, 5), (2, 24, 3, 5), (2, 30, 3, 5)]
    gen = wm.generators[1]
    full = gen.conv(phi[:, gen.offset:gen.offset + gen.in_channels])
    torch.testing.assert_close(torch.cat(w[1:], 1), full[:, :54])
    assert gen.conv.out_channels == 56  # 54 padded to a multiple of 8


@pytest.mark.parametrize("name", sorted(PUBLIC_GENERATORS))
def test_public_signal_slicing_structure(name):
    m = _model(name, signal_slicing="public")
    assert m.weight_mapper.structure() == PUBLIC_GENERATORS[name]
    # disjoint: same convs, consecutive slices covering phi once
    d = _model(name)
    st = d.weight_mapper.structure()
    assert [s[:3] for s in st] == [s[:3] for s in PUBLIC_GENERATORS[name]]
    offsets = [s[3] for s in st]
    widths = [s[4] for s in st]
    assert offsets == [sum(widths[:i]) for i in range(len(widths))]
    assert sum(widths) == d.context_head.out_channels
    assert _count(m) == _count(d)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model.train()
    model(x).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_public_prefix_slicing_leaves_context_half_unused():
    """The public v1_0 quirk: every generator reads a prefix of phi shorter than the in_conv half, so
    the context branch (down/up blocks) never affects the output."""
    m = _fresh("hyperseg-m", signal_slicing="public")
    grads = _grads(m, torch.randn(2, 3, 64, 128))
    for n, g in grads.items():
        if n.startswith(("context_head.down_blocks", "context_head.up_blocks")):
            assert g is None or g.abs().sum() == 0, n
    assert grads["context_head.in_conv.0.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
def test_bad_input_size_raises():
    m = _model("hyperseg-m")
    with pytest.raises(ValueError, match=r"input size 96x128 .*multiples of 64"):
        m(torch.randn(1, 3, 96, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(1, 4, 64, 64))
    v = _model("hyperseg-l-voc")
    with pytest.raises(ValueError, match=r"input size 64x128 .*multiples of 128"):
        v(torch.randn(1, 3, 64, 128))


@pytest.mark.slow
def test_training_step_and_disjoint_slicing_gradients():
    """Two gradient steps on one batch lower its loss; grads are finite; with the default disjoint
    slicing every weight-mapper and context-head parameter receives a non-zero gradient."""
    m = _fresh("hyperseg-m", num_classes=5)
    assert m.signal_slicing == "disjoint"
    x = torch.randn(2, 3, 64, 128)
    target = torch.randint(0, 5, (2, 64, 128))
    target[:, :8] = 255
    # plain gradient descent with a small step: the same batch's loss must go down (first order);
    # train-mode BN makes most layers scale-invariant, so their gradients are large
    opt = torch.optim.SGD(m.parameters(), lr=1e-5)
    m.train()
    losses = []
    for step in range(2):
        opt.zero_grad()
        out = m(x)
        assert out.shape == (2, 5, 64, 128)
        loss = F.cross_entropy(out, target, ignore_index=255)
        loss.backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if step == 0 and n.startswith(("weight_mapper.", "context_head.")):
                assert p.grad.abs().sum() > 0, f"{n} received no gradient"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_eval_is_per_sample_train_uses_batch_statistics():
    m = _randomize_bn(_fresh("hyperseg-s-camvid"))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        m.eval()
        both, single = m(x), m(x[:1])
        assert_close_logits(both[:1], single)
        before = m.decoder[-1].bn3.running_mean.clone()
        m.train()
        tb, ts = m(x), m(x[:1])
    assert not torch.allclose(tb[:1], ts, atol=1e-3)  # batch statistics couple the samples
    assert not torch.allclose(m.decoder[-1].bn3.running_mean, before)  # running stats updated in train
    assert not torch.allclose(tb, both, atol=1e-3)


def assert_close_logits(got, want, rel=1e-4):
    """Random-init logits: tolerance relative to the largest value (their scale varies with the init)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.skipif(not _extension.HAS_C, reason="no compiled kernels: the default backend is the reference")
def test_default_backend_matches_reference():
    m = _randomize_bn(_fresh("hyperseg-m")).eval()
    ref = copy.deepcopy(m).set_backend("reference")
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        with record_backends() as ran:
            got = m(x)
        assert {("meta_block", "cpu"), ("pointwise_block", "cpu")} <= set(ran)  # the fast paths ran
        with record_backends() as ran:
            want = ref(x)
        assert {be for _, be in ran} == {"reference"}
        assert_close_logits(got, want)


@pytest.mark.parametrize("backend", [
    pytest.param("auto", marks=pytest.mark.skipif(not _extension.has_kernel("patchwise_conv2d", "CPU"),
                                                  reason="no compiled CPU kernel: 'auto' is the reference")),
    "reference"])
def test_chained_meta_block_eval_folding(backend):
    """v0_1 block: eval mode folds each BN into the per-patch weights + bias; compare with the
    explicit chain conv -> BN(eval) -> ReLU6 -> ... in float64."""
    from pyseg.nn import ChainedMetaBlock
    from pyseg.nn.functional import patchwise_conv2d

    blk = _randomize_bn(ChainedMetaBlock(5, 3, backend=backend)).double().eval()
    x = torch.randn(2, 5, 12, 8, dtype=torch.float64)
    w = torch.randn(2, blk.weight_numel, 3, 2, dtype=torch.float64)
    hid = blk.hidden_channels
    w1, w2, w3 = torch.split(w, [hid * 5, hid * 9, 3 * hid], 1)
    y = F.relu6(blk.bn1(patchwise_conv2d(x, w1, kernel_size=1, backend="reference")))
    y = F.relu6(blk.bn2(patchwise_conv2d(y, w2, kernel_size=3, padding=1, padding_mode="reflect", groups=hid,
                                         backend="reference")))
    y = blk.bn3(patchwise_conv2d(y, w3, kernel_size=1, backend="reference"))
    with torch.no_grad(), record_backends() as ran:
        torch.testing.assert_close(blk(x, w), y)
    assert {be for _, be in ran} == {"cpu" if backend == "auto" else "reference"}
    with pytest.raises(ValueError, match="weight_numel"):
        blk(x, w[:, 1:])


def test_fuse_folds_static_batchnorm():
    m = _randomize_bn(_fresh("hyperseg-m")).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        y = m(x)
        n_bn = sum(isinstance(t, torch.nn.BatchNorm2d) for t in m.modules())
        m.fuse()
        n_after = sum(isinstance(t, torch.nn.BatchNorm2d) for t in m.modules())
        assert_close_logits(m(x), y)
    assert n_after == 2 * 3 + 3  # only the decoder's BNs remain (folded by the blocks themselves)
    assert n_bn > 60


def test_channels_last_and_num_classes_override():
    m = _model("hyperseg-s", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        y = m(x)
        cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
        y2 = cl(x.contiguous(memory_format=torch.channels_last))
    assert y.shape[1] == 7
    assert_close_logits(y2, y)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_100"])
def test_other_backbones(backbone):
    m = create_model("hyperseg-m", backbone=backbone, out_feat_scale=0.25).eval()
    assert m.encoder.signal_channels == (512 if backbone == "resnet18" else 1280)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 128)).shape == (1, 19, 64, 128)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_backbone_weights_from_local_file(tmp_path, fmt):
    import timm

    src = timm.create_model("mobilenetv2_100", pretrained=False)  # has a classifier: must be ignored
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    m = create_model("hyperseg-m", backbone="mobilenetv2_100", backbone_weights=str(path))
    torch.testing.assert_close(m.encoder.trunk.conv_head.weight, sd["conv_head.weight"])
    torch.testing.assert_close(m.encoder.trunk.blocks[3][0].conv_pw.weight, sd["blocks.3.0.conv_pw.weight"])
    bad = dict(sd)
    bad.pop("conv_head.weight")
    torch.save(bad, str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="missing .*conv_head.weight"):
        create_model("hyperseg-m", backbone="mobilenetv2_100", backbone_weights=str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("hyperseg-m", backbone="mobilenetv2_100", backbone_weights=str(tmp_path / "nope.pth"))


def test_decoder_macs_hyperseg_m():
    m = _model("hyperseg-m")
    macs = m.decoder_macs(512, 1024)
    # level 0 at stride 32: 82*64 MACs per pixel on 16x32 pixels
    assert macs["decoder.0"] == 82 * 64 * 16 * 32
    # level 4 (stride 2, patch 16x16 + halo): pw1 on 18x18 per patch, dw and pw2 on the pixels
    assert macs["decoder.4"] == 68 * 34 * 16 * 32 * 18 * 18 + 68 * 9 * 256 * 512 + 19 * 68 * 256 * 512


def test_hyperseg_class_validation():
    with pytest.raises(ValueError, match="signal_slicing"):
        create_model("hyperseg-m", signal_slicing="overlap")
    with pytest.raises(ValueError, match="kernel_sizes entries"):
        create_model("hyperseg-m", kernel_sizes=[1, 1, 1, 3, 5])
    assert isinstance(_model("hyperseg-m"), HyperSeg)


@pytest.mark.parametrize("shape", [(3, 5), (1, 3, 1024, 1024), (2, 1025, 1023)], ids=["small", "4MiB", "odd"])
@pytest.mark.parametrize("env", ["1", "0"])
def test_empty_for_write(shape, env, monkeypatch):
    """Huge-page advice never changes what the buffer is: shape, dtype, device, writable in full."""
    from pyseg._memory import empty_for_write

    monkeypatch.setenv("PYSEG_HUGE_PAGES", env)
    t = empty_for_write(*shape, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(3.0)
    assert bool((t == 3.0).all())


def test_fused_model_under_torch_compile():
    """The inference fast paths (banded expansions, level-input buffer, CPU final resize) trace:
    torch.compile (aot_eager) gives the eager output."""
    m = _fresh("hyperseg-m").eval().fuse().to_channels_last()
    x = torch.randn(1, 3, 64, 128).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
