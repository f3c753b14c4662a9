"""Inference-time folding of Conv2d -> BatchNorm pairs (found by tracing one forward pass)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.meta_block import bn_affine

__all__ = ["fold_conv_bn"]


def _bn_replacement(bn: nn.Module) -> nn.Module:
    # timm's BatchNormAct2d = BN -> drop -> act: keep the drop and act
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return nn.Identity()


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


@torch.no_grad()
def fold_conv_bn(model: nn.Module, example: torch.Tensor, skip=(), rtol: float = 1e-3) -> int:
    """Fold every eval-mode BatchNorm2d whose input is exactly the output of a Conv2d into that conv.

    Pairs are found with forward hooks on one run of ``model(example)``; modules inside ``skip`` are
    left alone. The folded model is checked against the original on ``example``; if the outputs differ
    (e.g. a conv output was also used elsewhere), the model is restored and RuntimeError is raised.
    Returns the number of folded pairs.
    """
    model.eval()
    skipped = {id(m) for s in skip for m in s.modules()}
    produced = {}
    pairs = []
    handles = []
    for name, m in model.named_modules():
        if id(m) in skipped:
            continue
        if type(m) is nn.Conv2d:
            def hook(mod, inp, out, name=name):
                produced[id(out)] = (name, out)
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            def pre(mod, inp, name=name):
                hit = produced.get(id(inp[0]))
                if hit is not None and hit[1] is inp[0]:
                    pairs.append((hit[0], name))
            handles.append(m.register_forward_pre_hook(pre))
    try:
        expected = model(example)
    finally:
        for h in handles:
            h.remove()
        produced.clear()
    convs = [c for c, _ in pairs]
    pairs = [(c, b) for c, b in pairs if convs.count(c) == 1]  # a conv feeding two BNs stays unfolded
    pairs = list(dict.fromkeys(pairs))
    backup = copy.deepcopy(model.state_dict()), {b: model.get_submodule(b) for _, b in pairs}
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale, shift = bn_affine(bn)
        w = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
        b = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype))
        else:
            conv.bias.copy_(b)
        _set(model, bn_name, _bn_replacement(bn))
    got = model(example)
    tol = rtol * max(1.0, float(expected.abs().max()))
    if not torch.allclose(got, expected, rtol=rtol, atol=tol):
        for conv_name, bn_name in pairs:
            _set(model, bn_name, backup[1][bn_name])
            conv = model.get_submodule(conv_name)
            if conv_name + ".bias" not in backup[0]:
                conv.bias = None
        model.load_state_dict(backup[0])
        raise RuntimeError(f"BatchNorm folding changed the output by {float((got - expected).abs().max()):.3g}; "
                           "the model was restored unfused")
    return len(pairs)
