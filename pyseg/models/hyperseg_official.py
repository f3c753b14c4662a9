"""Reader of the HyperSeg checkpoints released with the public implementation (Nirkin et al., release v1.0).

The checkpoint's ``arch`` is the public constructor call; :func:`hyperseg_kwargs` turns it into the keyword
arguments of :class:`pyseg.models.hyperseg.HyperSeg` that reproduce that model exactly:

* encoder: timm's ``tf_efficientnet_b{N}`` (BatchNorm eps 1e-3, the same blocks) with the public code's
  *static* TF-"same" padding -- computed once for the EfficientNet's config image size (240 px for B1,
  300 px for B3, ...) along its stride chain (``backbone_padding``) -- and reducer BatchNorms with eps 1e-3;
* signal slices: the public code's own layout, stored explicitly (``signal_slices``): in ``hyperseg_v1_0``
  every generator reads a prefix of phi (the slices overlap), in ``hyperseg_v1_0_unify`` they are
  consecutive, and ``hyperseg_v0_1`` divides phi with its older rule (no guaranteed unit per layer);
* everything else (context head, weight generators, decoder levels, residuals) maps one-to-one.

Accepted: every argument of the three ``hyperseg_efficientnet`` constructors. Arguments that only act at
construction or on list inputs are ignored: ``pretrained`` and ``weights_path`` (the checkpoint holds the
weights), ``inference_hflip`` and ``inference_gather`` (they act only when the public model is given an
image pyramid as a list; pyseg's models take tensors), ``decoder_dropout`` (used only with ``with_out_fc``)
and ``groups`` (unused by the public decoder). A few structural options the public code offers but pyseg
does not implement raise a ValueError naming the argument: ``with_out_fc=True``, ``level_layers`` other
than 1, ``decoder_groups`` other than 1, kernel sizes other than 1 and 3, per-level expand ratios that
differ between meta-block levels, ``in_nc`` other than 3, and for v0_1 ``down_groups``/``flat_groups``
other than 1, ``avg_pool=False`` and ``expand_ratio=1``.

Key map (public -> pyseg): ``backbone._conv_stem``/``_bn0``/``_blocks.N.*``/``_conv_head``/``_bn1`` ->
``encoder.trunk.*`` (block N = the N-th timm block in stage order; ``_expand_conv``/``_bn0``/
``_depthwise_conv``/``_bn1``/``_se_*``/``_project_conv``/``_bn2`` -> ``conv_pw``/``bn1``/``conv_dw``/``bn2``/
``se.*``/``conv_pwl``/``bn3``, or ``conv_dw``/``bn1``/``se.*``/``conv_pw``/``bn2`` for the expansion-free
first stage); ``backbone._feat_fc_i`` -> ``encoder.reducers.i``; ``weight_mapper.*`` (the public context
head) -> ``context_head.*``; the generators (``decoder.level_l...signal2weights``, ``decoder.weight_blocks.i``
or ``weight_mapper.out_conv.conv_i``) -> ``weight_mapper.generators.i.conv``; decoder BatchNorms ->
``decoder.l.bn*``. The cached coordinate buffers ``decoder.coord{h}_{w}`` (from ``coords_res``) are checked
(shape and values) and not stored: pyseg computes the same grids.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .official import CheckpointMismatchError, load_mapped, parse_arch

__all__ = ["from_checkpoint", "hyperseg_kwargs", "key_map", "CONSTRUCTORS", "EFFICIENTNET_IMAGE_SIZE"]

V1_0 = "hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet"
V1_0_UNIFY = "hyperseg.models.hyperseg_v1_0_unify.hyperseg_efficientnet"
V0_1 = "hyperseg.models.hyperseg_v0_1.hyperseg_efficientnet"
CONSTRUCTORS = (V1_0, V1_0_UNIFY, V0_1)

#: config image size of each public EfficientNet variant (its static padding is computed for it)
EFFICIENTNET_IMAGE_SIZE = {f"efficientnet-b{i}": s for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600, 672))}


# The public constructors' signatures (argument names and defaults), to bind an arch's arguments the way
# Python would call them: the constructor's own arguments, then those it forwards to its HyperGen.
def _sig_v1_0(model_name, pretrained=False, out_feat_scale=0.25, levels=3, weights_path=None, in_nc=3,
              num_classes=3, kernel_sizes=3, level_layers=1, level_channels=None, expand_ratio=1, groups=1,
              weight_groups=1, inference_hflip=False, inference_gather="mean", with_out_fc=False, decoder_groups=1,
              decoder_dropout=None, coords_res=None):
    pass


def _sig_v1_0_unify(model_name, pretrained=False, out_feat_scale=0.25, levels=3, weights_path=None, in_nc=3,
                    num_classes=3, kernel_sizes=3, level_layers=1, level_channels=None, expand_ratio=1, groups=1,
                    weight_groups=1, inference_hflip=False, inference_gather="mean", with_out_fc=False,
                    decoder_groups=1, decoder_dropout=None, coords_res=None, unify_level=None):
    pass


def _sig_v0_1(model_name, pretrained=False, levels=3, down_groups=1, flat_groups=1, weight_groups=1, avg_pool=True,
              weights_path=None, in_nc=3, num_classes=3, kernel_sizes=3, level_layers=1, expand_ratio=1, groups=1,
              inference_hflip=False, inference_gather="mean", with_out_fc=False, decoder_dropout=None):
    pass


_SIGNATURES = {V1_0: _sig_v1_0, V1_0_UNIFY: _sig_v1_0_unify, V0_1: _sig_v0_1}


def _bind(name: str, args: list, kwargs: dict) -> dict:
    sig = inspect.signature(_SIGNATURES[name])
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"arch {name}(...) has arguments the public constructor does not accept: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _per_level(value, levels: int, what: str) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels:
        return list(value)
    raise ValueError(f"arch: {what} must be a number or a list of {levels} (one per decoder level), got {value!r}")


def _require(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"arch: {msg}")


def _divide_v0_1(channels: int, counts: Sequence[int], unit: int) -> List[int]:
    """The public v0_1 division of phi among generators (no guaranteed unit per generator): groups of equal
    counts, largest total first (ties: smaller count first), each takes floor(units * its share) units,
    rounded down to a multiple of its size; the last group takes what is left."""
    _require(channels % unit == 0, f"the signal's {channels} channels are not a multiple of {unit}")
    units = channels // unit
    groups: Dict[int, List[int]] = {}
    for i, c in enumerate(counts):
        groups.setdefault(int(c), []).append(i)
    order = sorted(groups.items(), key=lambda kv: (-kv[0] * len(kv[1]), kv[0]))
    ratio = units / float(sum(counts))
    left = float(units)
    widths = [0] * len(counts)
    for gi, (c, members) in enumerate(order):
        n = len(members)
        if gi < len(order) - 1:
            got = max(c * n * ratio, 1.0) // n * n
            left -= got
        else:
            got = left
        for i in members:
            widths[i] = int(got // n * unit)
    return widths


def hyperseg_kwargs(arch: str) -> dict:
    """The :class:`~pyseg.models.hyperseg.HyperSeg` keyword arguments (with ``num_classes`` and ``name``)
    of the public HyperSeg model that ``arch`` constructs. ValueError for an unsupported constructor or
    argument value."""
    name, args, kwargs = parse_arch(arch)
    if name not in _SIGNATURES:
        from .official import UnsupportedArchError

        raise UnsupportedArchError(f"unsupported arch {name!r}: the HyperSeg reader supports " + ", ".join(CONSTRUCTORS))
    a = _bind(name, args, kwargs)
    model_name = a["model_name"]
    _require(model_name in EFFICIENTNET_IMAGE_SIZE,
             f"model_name must be one of {', '.join(EFFICIENTNET_IMAGE_SIZE)}, got {model_name!r}")
    _require(a["in_nc"] == 3, f"in_nc={a['in_nc']!r} is not supported (the public EfficientNet reads 3 channels)")
    _require(not a["with_out_fc"], "with_out_fc=True (an extra patch-wise output layer) is not supported by pyseg")
    num_classes = a["num_classes"]
    _require(isinstance(num_classes, int) and num_classes >= 1, f"num_classes must be a positive int, got {num_classes!r}")
    levels = a["levels"]
    _require(isinstance(levels, int) and levels >= 1, f"levels must be a positive int, got {levels!r}")
    out = dict(num_classes=num_classes, backbone="tf_efficientnet_b" + model_name.rsplit("b", 1)[1],
               backbone_padding=EFFICIENTNET_IMAGE_SIZE[model_name], reducer_bn_eps=1e-3, context_levels=levels,
               signal_slicing="public", round_weight_counts=False, signal_unit=None, unify_level=None)
    if name == V0_1:
        L = 6  # the v0_1 decoder always has a level per skip: the image and the five encoder features
        kernel_sizes = _per_level(a["kernel_sizes"], L, "kernel_sizes")
        wg = a["weight_groups"]
        _require(isinstance(wg, int) and wg >= 1, f"weight_groups must be a positive int for v0_1, got {wg!r}")
        _require(a["down_groups"] == 1 and a["flat_groups"] == 1,
                 "down_groups/flat_groups other than 1 (grouped context head convolutions) are not supported")
        _require(a["avg_pool"] is True, "avg_pool=False (no global context in the v0_1 head) is not supported")
        er = a["expand_ratio"]
        _require(isinstance(er, (int, float)) and not isinstance(er, bool), f"expand_ratio must be a number, got {er!r}")
        _require(er != 1 or all(k == 1 for k in kernel_sizes),
                 "expand_ratio=1 (v0_1 blocks without the expansion layer) is not supported")
        out.update(out_feat_scale=0.25, kernel_sizes=kernel_sizes, level_channels=None, weight_groups=wg,
                   expand_ratio=er, context_head="v0_1", decoder="v0_1", public_signal_layout="disjoint",
                   signal_unit=max(8, wg))
    else:
        lc = a["level_channels"]
        _require(isinstance(lc, (list, tuple)) and 1 <= len(lc) <= 6,
                 f"level_channels must be a list of 1..6 channel counts (the public v1_0 decoder needs it), got {lc!r}")
        L = len(lc)
        kernel_sizes = _per_level(a["kernel_sizes"], L, "kernel_sizes")
        wg = a["weight_groups"]
        _require(isinstance(wg, (list, tuple)) and all(isinstance(g, int) and g >= 1 for g in wg),
                 f"weight_groups must be a list of positive ints for v1_0 (one per generator), got {wg!r}")
        dg = a["decoder_groups"]
        _require(all(g == 1 for g in (dg if isinstance(dg, (list, tuple)) else [dg])),
                 f"decoder_groups={dg!r} (grouped 1x1 decoder levels) is not supported")
        ers = _per_level(a["expand_ratio"], L, "expand_ratio")
        meta = sorted({er for er, k in zip(ers, kernel_sizes) if k != 1})
        _require(len(meta) <= 1, f"expand_ratio must be equal for all kernel-3 levels, got {a['expand_ratio']!r}")
        ofs = a["out_feat_scale"]
        _require(isinstance(ofs, (int, float)) or (isinstance(ofs, (list, tuple)) and len(ofs) == 5),
                 f"out_feat_scale must be a number or a list of 5, got {ofs!r}")
        out.update(out_feat_scale=list(ofs) if isinstance(ofs, (list, tuple)) else ofs, kernel_sizes=kernel_sizes,
                   level_channels=list(lc), weight_groups=list(wg), expand_ratio=meta[0] if meta else 2,
                   context_head="v1_0", decoder="v1_0", public_signal_layout="prefix")
        if name == V1_0_UNIFY:
            u = a["unify_level"]
            _require(isinstance(u, int) and u >= 1, f"unify_level must be an int >= 1 for v1_0_unify, got {u!r}")
            out.update(unify_level=u, public_signal_layout="disjoint")
        coords = a["coords_res"]
        if coords:
            out["input_size"] = tuple(coords[-1])
    _require(all(k in (1, 3) for k in kernel_sizes),
             f"kernel_sizes must be 1 or 3 per level (pyseg's patch-wise levels and meta blocks), got {kernel_sizes}")
    _require(a["level_layers"] == 1 or a["level_layers"] == [1] * L or a["level_layers"] == (1,) * L,
             f"level_layers={a['level_layers']!r} (several dynamic layers per level) is not supported")
    out["signal_slices"] = _public_slices(out, name)
    registered = _registry_name(out)
    out["name"] = registered or _UNREGISTERED
    if "input_size" not in out:
        from .configs import HYPERSEG_CONFIGS

        out["input_size"] = tuple(HYPERSEG_CONFIGS[registered]["input_size"]) if registered else None
    return out


def _public_slices(kw: dict, name: str) -> List[Tuple[int, int]]:
    """(offset, width) per generator, as the public code lays them out (see the module docstring)."""
    from .hyperseg import HyperSeg

    probe = dict(kw, signal_slices=None)
    if name == V0_1:
        probe.update(signal_slicing="disjoint", signal_unit=kw["weight_groups"])
    with torch.device("meta"):
        model = HyperSeg(**probe)
    wm = model.weight_mapper
    if name != V0_1:
        return [tuple(s) for s in wm.slices]  # pyseg's Algorithm 1 with the public layout (prefix / disjoint)
    counts = [-(-n // g.groups) * g.groups for n, g in zip(wm.level_weights, wm.generators)]
    widths = _divide_v0_1(wm.signal_channels, counts, kw["signal_unit"])
    _require(all(w > 0 for w in widths), f"the public v0_1 division gives an empty signal slice: {widths}")
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    return list(zip(offsets, widths))


_UNREGISTERED = "hyperseg-public-arch"  # name (in messages) of a public architecture that is no registered config
_STRUCTURE = ("kernel_sizes", "level_channels", "weight_groups", "out_feat_scale", "unify_level", "context_head",
              "context_levels", "decoder", "expand_ratio")


def _registry_name(kw: dict) -> Optional[str]:
    """The registered HyperSeg config with the same structure (backbone family, levels, channels...)."""
    from .configs import HYPERSEG_CONFIGS

    family = kw["backbone"].replace("tf_", "")
    for cname, cfg in HYPERSEG_CONFIGS.items():
        if cfg["backbone"] != family or cfg["num_classes"] != kw["num_classes"]:
            continue
        if all(_same(cfg.get(k), kw.get(k)) for k in _STRUCTURE):
            return cname
    return None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (int, float)):
        return all(_same(x, b) for x in a)
    if isinstance(b, (list, tuple)) and isinstance(a, (int, float)):
        return _same(b, a)
    return a == b


# ----------------------------------------------------------------------------------------------
_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1", "se": "se",
       "conv_pwl": "_project_conv", "bn3": "_bn2"}
_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se": "se", "conv_pw": "_project_conv", "bn2": "_bn2"}


def _public_key(key: str, model, arch_name: str, flat_index: Dict[Tuple[int, int], Tuple[int, bool]]) -> str:
    """The public state-dict key of pyseg ``model``'s ``key`` (raises KeyError for a key with no public name)."""
    def conv_tail(rest: str) -> str:  # ".1.weight" of a padded conv (ZeroPad2d, Conv2d) -> ".weight"
        return rest[2:] if rest.startswith("1.") else rest

    m = re.fullmatch(r"encoder\.trunk\.(conv_stem|bn1|conv_head|bn2)\.(.+)", key)
    if m:
        mod, rest = m.groups()
        pub = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}[mod]
        return f"backbone.{pub}.{conv_tail(rest) if mod.startswith('conv') else rest}"
    m = re.fullmatch(r"encoder\.trunk\.blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key)
    if m:
        s, i, sub, rest = m.groups()
        n, inverted = flat_index[(int(s), int(i))]
        table = _IR if inverted else _DS
        if sub == "se":
            part, _, rest = rest.partition(".")
            return f"backbone._blocks.{n}._se_{ {'conv_reduce': 'reduce', 'conv_expand': 'expand'}[part] }.{rest}"
        return f"backbone._blocks.{n}.{table[sub]}.{conv_tail(rest) if sub.startswith('conv') else rest}"
    m = re.fullmatch(r"encoder\.reducers\.(\d+)\.(.+)", key)
    if m:
        return f"backbone._feat_fc_{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"context_head\.(.+)", key)
    if m:
        rest = m.group(1)
        if arch_name == V0_1:
            rest = re.sub(r"^(down|flat)_blocks\.(\d+)\.", r"\1_\2.", rest)
        return f"weight_mapper.{rest}"
    levels = "level_blocks." if arch_name == V1_0_UNIFY else "level_"
    m = re.fullmatch(r"weight_mapper\.generators\.(\d+)\.conv\.weight", key)
    if m:
        i = int(m.group(1))
        if arch_name == V0_1:
            return f"weight_mapper.out_conv.conv_{i}.weight"
        if arch_name == V1_0_UNIFY:
            return f"decoder.weight_blocks.{i}.signal2weights.weight"
        inner = ".0" if model.decoder[i].kernel_size == 1 else ""
        return f"decoder.level_{i}.0{inner}.signal2weights.weight"
    m = re.fullmatch(r"decoder\.(\d+)\.bn(\d?)\.(.+)", key)
    if m:
        lvl, j, rest = m.groups()
        if not j:
            return f"decoder.{levels}{lvl}.0.1.{rest}"
        if arch_name == V0_1:
            return f"decoder.level_{lvl}.0.conv.{int(j) - 1}.1.{rest}"
        return f"decoder.{levels}{lvl}.0.bn{j}.{rest}"
    raise KeyError(key)


def key_map(model, arch: str) -> Dict[str, Optional[str]]:
    """{public key: pyseg key} for every tensor of ``model`` (built from ``arch``), plus the public
    coordinate buffers (mapped to None: checked, not stored)."""
    name, args, kwargs = parse_arch(arch)
    blocks = model.encoder.trunk.blocks
    flat, n = {}, 0
    for s, stage in enumerate(blocks):
        for i, blk in enumerate(stage):
            flat[(s, i)] = (n, hasattr(blk, "conv_pwl"))
            n += 1
    out = {_public_key(k, model, name, flat): k for k in model.state_dict()}
    for key in _coord_keys(name, args, kwargs, len(model.decoder)):
        out[key] = None
    return out


def _coord_keys(name, args, kwargs, levels) -> List[str]:
    if name == V0_1:
        return []
    coords = _bind(name, args, kwargs)["coords_res"] or []
    keys = []
    for res in coords:
        for i in range(levels):
            k = f"decoder.coord{res[0] // 2 ** i}_{res[1] // 2 ** i}"
            if k not in keys:
                keys.append(k)
    return keys


def _check_coords(state_dict, keys, source):
    """The public cached coordinate grids must be the (x, y) linspace grids pyseg computes."""
    from .hyperseg import image_coordinates

    bad, shapes = [], []
    for k in keys:
        v = state_dict.get(k)
        if not isinstance(v, Tensor):
            continue  # reported as missing by load_mapped
        h, w = (int(t) for t in k[len("decoder.coord"):].split("_"))
        if tuple(v.shape) != (1, 2, h, w):
            shapes.append((k, k + " (recomputed)", tuple(v.shape), (1, 2, h, w)))
        elif not torch.allclose(v.float(), image_coordinates(torch.empty(1, 1, h, w)), atol=1e-6, rtol=0):
            bad.append(k)
    if shapes:
        raise CheckpointMismatchError(source, [], [], shapes, "the public HyperSeg coordinate grids")
    if bad:
        raise ValueError(f"{source}: coordinate buffers {', '.join(bad)} are not the linspace(-1, 1) grids of the "
                         f"public code; the model would not reproduce its predictions")


def from_checkpoint(checkpoint: dict, source: str = "checkpoint"):
    """Build and load the pyseg HyperSeg of a public checkpoint dict (``state_dict`` without ``module.``,
    ``arch``). Used by :func:`pyseg.models.from_official`."""
    from .hyperseg import HyperSeg

    arch = checkpoint["arch"]
    kw = hyperseg_kwargs(arch)
    model = HyperSeg(**kw)
    exact = kw["name"] != _UNREGISTERED
    # an architecture that is no registered config is rebuilt through any HyperSeg entry: the kwargs say all
    model.pyseg_config = {"model": kw["name"] if exact else "hyperseg-m", "num_classes": kw["num_classes"],
                          "model_kwargs": {k: v for k, v in kw.items() if k not in ("num_classes", "name")},
                          "registered_config": exact}
    model.official_arch = arch
    sd = checkpoint["state_dict"]
    km = key_map(model, arch)
    _check_coords(sd, [k for k, v in km.items() if v is None], source)
    load_mapped(model, sd, km, source=source, what=f"the public HyperSeg model of its arch ({kw['name']})")
    return model.eval()
