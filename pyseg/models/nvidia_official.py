"""Reader of NVIDIA HMSA checkpoints (github NVIDIA/semantic-segmentation) for :func:`pyseg.models.from_official`.

Their training code saves ``dict(epoch, arch, num_classes, state_dict, optimizer, mean_iu, command)`` with the
state dict of a DataParallel/DDP-wrapped net (``module.`` prefix, removed by the dispatcher). Supported ``arch``:

* ``mscale.DeepV3R50``    -> ``hmsa-deeplabv3p-resnet50`` (:class:`pyseg.models.mscale.DeepLabV3PlusMscale`)
* ``ocrnet.HRNet_Mscale`` -> ``hmsa-ocrnet-hrnet-w48``    (:class:`pyseg.models.mscale.HRNetOCR`), the layout of
  their released Cityscapes / Mapillary weights.

Keys are renamed through the prefix tables below (data, one entry per module); every checkpoint tensor must map
one-to-one with its shape onto the pyseg model, else one error lists the missing, unexpected and mis-shaped keys
and nothing is loaded (their own restore skips mismatches silently; pyseg does not). ``optimizer`` is ignored;
``epoch``, ``mean_iu`` and ``command`` are kept in ``model.checkpoint_info``. :func:`to_nvidia_state_dict` is the
inverse mapping (a pyseg model's weights in NVIDIA's layout, e.g. to evaluate them with NVIDIA's code).
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple

from torch import nn

__all__ = ["ARCHS", "KEY_PREFIXES", "to_pyseg_key", "to_nvidia_key", "to_nvidia_state_dict", "from_checkpoint"]

#: NVIDIA ``arch`` -> pyseg registered model name
ARCHS = {"mscale.DeepV3R50": "hmsa-deeplabv3p-resnet50", "ocrnet.HRNet_Mscale": "hmsa-ocrnet-hrnet-w48"}

_ATTENTION = [("scale_attn.conv0.", "attention.body.0."), ("scale_attn.bn0.", "attention.body.1."),
              ("scale_attn.conv1.", "attention.body.3."), ("scale_attn.bn1.", "attention.body.4."),
              ("scale_attn.conv2.", "attention.body.6.")]
_OCB = "ocr.ocr_distri_head.object_context_block."

#: arch -> [(NVIDIA key prefix, pyseg key prefix)]; a key takes the longest matching prefix
KEY_PREFIXES: Dict[str, List[Tuple[str, str]]] = {
    "mscale.DeepV3R50": [
        ("backbone.layer0.0.", "model.trunk.conv1."), ("backbone.layer0.1.", "model.trunk.bn1."),
        *[(f"backbone.layer{i}.", f"model.trunk.layer{i}.") for i in range(1, 5)],
        ("aspp.img_conv.0.", "model.aspp.pool.1."), ("aspp.img_conv.1.", "model.aspp.pool.2."),
        *[(f"aspp.features.{i}.", f"model.aspp.branches.{i}.") for i in range(4)],
        ("bot_aspp.", "model.aspp_reduce."), ("bot_fine.", "model.low_reduce."),
        *[(f"final.{i}.", f"model.head.{i}.") for i in (0, 1, 3, 4, 6)],
        *_ATTENTION],
    "ocrnet.HRNet_Mscale": [
        ("backbone.", "model.trunk."),
        ("ocr.conv3x3_ocr.0.", "model.ocr.reduce.0."), ("ocr.conv3x3_ocr.1.0.", "model.ocr.reduce.1."),
        ("ocr.aux_head.0.", "model.ocr.aux.0."), ("ocr.aux_head.1.0.", "model.ocr.aux.1."),
        ("ocr.aux_head.2.", "model.ocr.aux.3."), ("ocr.cls_head.", "model.ocr.classifier."),
        *[(f"{_OCB}{theirs}.{a}", f"model.ocr.context.{ours}.{b}")
          for theirs, ours in (("f_pixel", "query"), ("f_object", "key"))
          for a, b in (("0.", "0."), ("1.0.", "1."), ("2.", "3."), ("3.0.", "4."))],
        *[(f"{_OCB}{theirs}.{a}", f"model.ocr.context.{ours}.{b}")
          for theirs, ours in (("f_down", "value"), ("f_up", "up")) for a, b in (("0.", "0."), ("1.0.", "1."))],
        ("ocr.ocr_distri_head.conv_bn_dropout.0.", "model.ocr.context.fuse.0."),
        ("ocr.ocr_distri_head.conv_bn_dropout.1.0.", "model.ocr.context.fuse.1."),
        *_ATTENTION],
}


def _rename(key: str, table, src_col: int) -> Optional[str]:
    best = None
    for pair in table:
        p = pair[src_col]
        if key.startswith(p) and (best is None or len(p) > len(best[src_col])):
            best = pair
    return None if best is None else best[1 - src_col] + key[len(best[src_col]):]


def to_pyseg_key(arch: str, key: str) -> Optional[str]:
    """pyseg key of NVIDIA key ``key`` (without ``module.``), None when no rule applies."""
    return _rename(key, KEY_PREFIXES[arch], 0)


def to_nvidia_key(arch: str, key: str) -> Optional[str]:
    """NVIDIA key (without ``module.``) of pyseg key ``key``, None when no rule applies."""
    return _rename(key, KEY_PREFIXES[arch], 1)


def _arch_of(model: nn.Module) -> str:
    from .mscale import DeepLabV3PlusMscale, HRNetOCR

    inner = getattr(model, "model", None)
    for arch, cls in (("mscale.DeepV3R50", DeepLabV3PlusMscale), ("ocrnet.HRNet_Mscale", HRNetOCR)):
        if isinstance(inner, cls):
            return arch
    raise TypeError(f"expected an hmsa-deeplabv3p-resnet50 or hmsa-ocrnet-hrnet-w48 model, got {type(model).__name__}"
                    f" over {type(inner).__name__}")


def to_nvidia_state_dict(model: nn.Module, prefix: str = "module.") -> Tuple[str, dict]:
    """(arch, state dict in NVIDIA's layout with ``prefix``) of an NVIDIA-layout pyseg model."""
    arch = _arch_of(model)
    out = {}
    for k, v in model.state_dict().items():
        nk = to_nvidia_key(arch, k)
        if nk is None:
            raise KeyError(f"no NVIDIA key for pyseg key {k!r} ({arch})")
        out[prefix + nk] = v
    return arch, out


def from_checkpoint(checkpoint: dict, source: str = "checkpoint") -> nn.Module:
    """The pyseg model of an NVIDIA HMSA checkpoint (``state_dict`` without ``module.``), loaded, in eval mode."""
    from .official import UnsupportedArchError, load_mapped
    from .registry import create_model

    arch = checkpoint.get("arch")
    if arch not in ARCHS:
        raise UnsupportedArchError(f"{source}: unsupported NVIDIA arch {arch!r}; pyseg reads "
                                   + ", ".join(ARCHS))
    nc = checkpoint.get("num_classes")
    if isinstance(nc, bool) or not isinstance(nc, numbers.Integral) or nc < 1:
        raise ValueError(f"{source}: num_classes must be a positive int in an NVIDIA checkpoint, got {nc!r}")
    sd = checkpoint["state_dict"]
    name = ARCHS[arch]
    model = create_model(name, num_classes=int(nc))
    key_map = {k: m for k in sd if (m := to_pyseg_key(arch, k)) is not None}
    load_mapped(model, sd, key_map, source=source, what=f"pyseg {name} ({arch}, {nc} classes)")
    model.checkpoint_info = {k: checkpoint.get(k) for k in ("arch", "num_classes", "epoch", "mean_iu", "command")}
    model.pyseg_config = {"model": name, "num_classes": int(nc), "model_kwargs": {}}
    return model.eval()
