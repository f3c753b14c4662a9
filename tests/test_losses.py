"""Losses: cross-entropy, bootstrapped cross-entropy and RMI, each against an independent slow computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyseg.losses import (BootstrappedCrossEntropy, CrossEntropy, RMILoss, bootstrapped_cross_entropy, build_loss,
                          rmi_loss)


def _inputs(b=2, c=4, h=7, w=9, ignore_frac=0.2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=dtype) * 2
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def test_cross_entropy_matches_torch_and_handles_all_ignored():
    logits, target = _inputs()
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(CrossEntropy()(logits, target), ref)
    logits.requires_grad_(True)
    out = CrossEntropy()(logits, torch.full_like(target, 255))
    out.backward()
    assert out.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()


def _slow_bootstrap(logits, target, k, thresh):
    per_image = []
    for b in range(logits.shape[0]):
        losses = []
        for i in range(target.shape[1]):
            for j in range(target.shape[2]):
                t = int(target[b, i, j])
                if t == 255:
                    continue
                z = logits[b, :, i, j].tolist()
                m = max(z)
                lse = m + math.log(sum(math.exp(v - m) for v in z))
                losses.append(lse - z[t])
        if not losses:
            continue
        hard = [v for v in losses if math.exp(-v) < thresh]
        kept = hard if len(hard) >= k else sorted(losses, reverse=True)[:k]
        per_image.append(sum(kept) / len(kept))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("k,thresh", [(5, 0.3), (1000, 0.3), (3, 0.9), (40, 0.05), (1, 1.0)])
def test_bootstrapped_ce_against_slow_definition(k, thresh):
    logits, target = _inputs(b=3, seed=k)
    target[2] = 255  # an image without labelled pixels is left out of the mean
    got = bootstrapped_cross_entropy(logits, target, k=k, thresh=thresh)
    assert got.item() == pytest.approx(_slow_bootstrap(logits, target, k, thresh), rel=1e-10)
    assert BootstrappedCrossEntropy(k, thresh)(logits, target).item() == pytest.approx(got.item())


def test_bootstrapped_ce_regimes():
    # confident everywhere: no hard pixels, so the k hardest are used; k >= #valid equals plain CE per image
    logits, target = _inputs(b=1, ignore_frac=0.0)
    full = bootstrapped_cross_entropy(logits, target, k=10**6, thresh=1e-9)
    assert torch.allclose(full, F.cross_entropy(logits, target))
    # with k = 1 and no hard pixel the loss is the single largest pixel loss
    pix = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(bootstrapped_cross_entropy(logits, target, k=1, thresh=1e-9), pix.max())
    # with thresh 1.0 every pixel is hard (p < 1): plain CE again
    assert torch.allclose(bootstrapped_cross_entropy(logits, target, k=1, thresh=1.0), full)


def test_bootstrapped_ce_gradient_and_all_ignored():
    logits, target = _inputs(b=2, c=3, h=4, w=5)
    logits.requires_grad_(True)
    torch.autograd.gradcheck(lambda z: bootstrapped_cross_entropy(z, target, k=6, thresh=0.3), (logits,))
    z = torch.zeros(1, 3, 4, 4, requires_grad=True)
    out = bootstrapped_cross_entropy(z, torch.full((1, 4, 4), 255))
    out.backward()
    assert out.item() == 0.0


def _avg_pool_slow(x, k, s):
    """count_include_pad average pooling with padding k // 2, by loops (numpy, float64)."""
    p = k // 2
    h, w = x.shape
    xp = np.zeros((h + 2 * p, w + 2 * p))
    xp[p:p + h, p:p + w] = x
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[i, j] = xp[i * s:i * s + k, j * s:j * s + k].sum() / (k * k)
    return out


def _slow_rmi(logits, target, radius=3, pool_size=3, pool_stride=3, bce_weight=0.5, alpha=5e-4, clip_min=1e-6):
    z = logits.detach().numpy().astype(np.float64)
    t = target.numpy()
    b, c, h, w = z.shape
    valid = t != 255
    y = np.zeros_like(z)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                if valid[n, i, j]:
                    y[n, t[n, i, j], i, j] = 1.0
    v = valid[:, None].astype(np.float64)
    bce_el = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    bce = (bce_el * v).sum() / (valid.sum() + 1.0)
    prob = 1 / (1 + np.exp(-z)) * v + clip_min
    d = radius * radius
    total = 0.0
    for cls in range(c):
        vals = []
        for n in range(b):
            ym, pm = y[n, cls], prob[n, cls]
            if pool_stride > 1:
                ym, pm = _avg_pool_slow(ym, pool_size, pool_stride), _avg_pool_slow(pm, pool_size, pool_stride)
            hh, ww = ym.shape
            cols_y, cols_p = [], []
            for i in range(hh - radius + 1):
                for j in range(ww - radius + 1):
                    cols_y.append([ym[i + dy, j + dx] for dy in range(radius) for dx in range(radius)])
                    cols_p.append([pm[i + dy, j + dx] for dy in range(radius) for dx in range(radius)])
            Y = np.array(cols_y).T
            P = np.array(cols_p).T
            Y = Y - Y.mean(1, keepdims=True)
            P = P - P.mean(1, keepdims=True)
            sy, sp, syp = Y @ Y.T, P @ P.T, Y @ P.T
            var = sy - syp @ np.linalg.inv(sp + alpha * np.eye(d)) @ syp.T
            sign, logdet = np.linalg.slogdet(var + alpha * np.eye(d))
            assert sign > 0
            vals.append(0.5 * logdet)
        total += np.mean(vals) / d
    return bce_weight * bce + (1 - bce_weight) * total


@pytest.mark.parametrize("shape,pool_stride,radius", [((2, 3, 11, 13), 3, 3), ((1, 2, 7, 8), 1, 3),
                                                      ((2, 4, 10, 9), 2, 2)])
def test_rmi_against_slow_float64(shape, pool_stride, radius):
    b, c, h, w = shape
    logits, target = _inputs(b, c, h, w, seed=h)
    got = rmi_loss(logits, target, radius=radius, pool_size=3, pool_stride=pool_stride)
    ref = _slow_rmi(logits, target, radius=radius, pool_size=3, pool_stride=pool_stride)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref, rel=1e-8, abs=1e-9)
    f32 = RMILoss(radius=radius, pool_stride=pool_stride)(logits.float(), target)
    assert f32.dtype == torch.float32 and f32.item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_rmi_only_term_and_gradient():
    logits, target = _inputs(1, 2, 9, 9, seed=5)
    got = rmi_loss(logits, target, bce_weight=0.0)
    assert got.item() == pytest.approx(_slow_rmi(logits, target, bce_weight=0.0), rel=1e-8)
    z = logits[:, :, :6, :6].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: rmi_loss(x, target[:, :6, :6], pool_stride=1), (z,), atol=1e-6)


def test_rmi_prefers_correct_predictions():
    _, target = _inputs(2, 3, 24, 24, ignore_frac=0.0, seed=1)
    good = F.one_hot(target, 3).permute(0, 3, 1, 2).double() * 12 - 6
    bad = torch.randn_like(good)
    assert rmi_loss(good, target, bce_weight=0.0) < rmi_loss(bad, target, bce_weight=0.0)


def test_rmi_too_small_map():
    logits, target = _inputs(1, 2, 4, 4)
    with pytest.raises(ValueError, match="RMI needs maps of at least 3x3"):
        rmi_loss(logits, target, pool_stride=3)


def test_shape_checks_and_factory():
    logits, target = _inputs()
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\)"):
        CrossEntropy()(logits, target[:, :-1])
    with pytest.raises(ValueError, match=r"logits must be \(B, C, H, W\)"):
        bootstrapped_cross_entropy(logits[0], target)
    with pytest.raises(ValueError, match="num_classes=5 but logits have 4"):
        rmi_loss(logits, target, num_classes=5)
    assert isinstance(build_loss("ce"), CrossEntropy)
    assert build_loss("bootstrap", k=7).k == 7
    assert isinstance(build_loss("rmi", num_classes=4), RMILoss)
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        build_loss("dice")
