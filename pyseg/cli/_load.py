"""Build a model from a checkpoint written by ``pyseg-train``/``pyseg-convert`` (its metadata names the model) or
a released one (``.pth``, :func:`pyseg.models.from_official`)."""
from __future__ import annotations

from ..engine.checkpoint import load_weights, read_metadata
from ..engine.build import build_model, import_extra, resolve_device
from ._common import CommandError, require_file


def load_model_from_args(args):
    """(model in eval mode on its device, metadata, device) from ``--checkpoint`` and optional overrides."""
    import_extra(args.imports)
    require_file(args.checkpoint, "checkpoint")
    from ..models.official import is_safetensors, load_pretrained

    if not is_safetensors(args.checkpoint):  # a released checkpoint (.pth), e.g. the public HyperSeg weights
        model = load_pretrained(args.checkpoint, args.model, args.num_classes, **args.model_kwargs)
        cfg = model.pyseg_config
        meta = {"model": cfg["model"], "num_classes": cfg["num_classes"], "model_kwargs": cfg["model_kwargs"]}
        device = resolve_device(args.device)
        model.to(device).eval()
        return model, meta, device
    meta = read_metadata(args.checkpoint)
    name = args.model or meta.get("model")
    if not name:
        raise CommandError(f"{args.checkpoint} does not name its model; pass --model")
    num_classes = args.num_classes or meta.get("num_classes")
    if not num_classes:
        raise CommandError(f"{args.checkpoint} does not record num_classes; pass --num-classes")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(args.model_kwargs)
    model = build_model(name, int(num_classes), kwargs)
    load_weights(model, args.checkpoint)
    device = resolve_device(args.device)
    model.to(device).eval()
    return model, meta, device
