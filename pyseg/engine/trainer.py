"""The training loop behind ``pyseg-train`` (options: ``pyseg.cli.train``).

Outline: torchrun environment → process group (gloo on CPU, nccl on CUDA); model from the registry; datasets with
the joint transforms; ``DistributedSampler`` (also with one process, so the order of samples is a function of
the seed and the epoch only); optional SyncBN; ``DistributedDataParallel``; Adam/AdamW/SGD; poly LR stepped
every iteration; AMP (bf16/fp16 autocast on CUDA, bf16 optional on CPU); validation every ``--val-every``
epochs; ``last``/``best`` checkpoints at epoch ends (see :mod:`pyseg.engine.checkpoint`); ``metrics.jsonl``.

Resuming restores weights, optimiser, scheduler, AMP scaler, epoch/step, best metric and every rank's RNG states,
so a run interrupted at an epoch boundary (``--stop-after-epochs`` or a crash after a checkpoint) and resumed
with ``--resume`` follows the uninterrupted trajectory exactly on the CPU with ``--workers 0`` (with workers the
per-epoch worker seeds are also restored from the main RNG, but GPU kernels may not be deterministic).
Checkpoints are written at epoch ends only; a crash mid-epoch resumes from the last completed epoch.

Freezing (``--freeze PREFIX ...``): parameters whose qualified name equals a prefix or starts with
``prefix + "."`` stop requiring gradients, and the modules with those names are kept in eval mode (frozen BN
statistics). This is the hook for staged training (e.g. hierarchical multi-scale attention: ``--freeze trunk``
to train only the attention head, with ``--init stage1.safetensors``); a prefix that matches nothing is an error.
``--stage N`` (hierarchical multi-scale attention models) applies the model's ``set_stage(N)`` instead: the
parameters it freezes stop training and its wholly frozen submodules are kept in eval mode; in stage 1 the model
returns each scale's own logits and the loss is summed over the scales. ``--recipe hmsa-staged`` runs the three
stages in a row (:mod:`pyseg.engine.recipe`).

Data mixing (``--extra-data KIND:PATH``, e.g. pseudo-labels written by ``pyseg-predict --pseudo-labels``): the
extra set is concatenated to the training set and every epoch draws ``len(train) + len(extra)`` samples, a share
``--extra-weight`` of them from the extra set (:class:`pyseg.data.sampling.WeightedEpochSampler`, seeded by the
seed and the epoch); ``--class-uniform P`` draws a share P of each source's samples class-uniformly.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ..data import build_dataset, build_eval_transform, build_train_transform
from ..data.sampling import WeightedEpochSampler, class_presence, mixing_weights
from ..data.transforms import seed_worker
from ..losses import build_loss
from . import checkpoint as ckpt
from .distributed import (ShardSampler, all_gather_object, barrier, cleanup_distributed, init_distributed,
                          is_dist, is_main, reduce_mean)
from .evaluator import autocast_context, evaluate
from .build import build_model, import_extra, resolve_device  # noqa: F401  (also the trainer's API)
from .inference import extract_logits
from .progress import progress, resolve_mode

__all__ = ["train", "import_extra", "resolve_device", "apply_freeze", "apply_stage", "build_model", "poly_lambda",
           "build_train_sampler", "training_loss"]


def apply_freeze(model: torch.nn.Module, prefixes) -> list[str]:
    """Freeze parameters/modules under the given name prefixes; returns the frozen module names."""
    if not prefixes:
        return []
    names = dict(model.named_modules())
    frozen = []
    for pre in prefixes:
        pre = pre.rstrip(".")
        hit = False
        for pname, p in model.named_parameters():
            if pname == pre or pname.startswith(pre + "."):
                p.requires_grad_(False)
                hit = True
        if pre in names:
            frozen.append(pre)
            hit = True
        if not hit:
            top = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"--freeze prefix {pre!r} matches no parameter or module of the model "
                             f"(top-level modules: {top})")
    return frozen


def apply_stage(model: torch.nn.Module, stage: int | None) -> list[str]:
    """``model.set_stage(stage)`` (hierarchical multi-scale attention staged training); returns the names of the
    submodules it froze entirely (to keep in eval mode). ``None``: nothing to do."""
    if stage is None:
        return []
    if not callable(getattr(model, "set_stage", None)):
        raise ValueError(f"--stage needs a model with set_stage() (hierarchical multi-scale attention, e.g. "
                         f"hmsa-deeplabv3p-mobilenetv2); {type(model).__name__} has none")
    from ..nn.hmsa import frozen_modules

    model.set_stage(stage)
    return frozen_modules(model)


def _extra_dataset(cfg, transform, train_set):
    """The ``--extra-data KIND:PATH`` set (folder layouts without a split folder are read whole), checked
    against the training set's classes."""
    kind, root = cfg.extra_data
    split = None if kind == "folder" else cfg.train_split
    extra = build_dataset(kind, root, split, transform)
    if tuple(extra.classes) != tuple(train_set.classes):
        raise ValueError(f"--extra-data {kind}:{root} has classes {list(extra.classes)}, the training set "
                         f"{list(train_set.classes)}")
    return extra


def build_train_sampler(train_set, extra_set=None, extra_weight: float | None = None, class_uniform: float = 0.0,
                        num_classes: int | None = None, seed: int = 0, world: int = 1, rank: int = 0):
    """(dataset, sampler) of the training loader. Plain: ``train_set`` with a shuffling ``DistributedSampler``.
    With an ``extra_set`` (drawn with share ``extra_weight``) or ``class_uniform`` > 0: their concatenation
    with a :class:`~pyseg.data.sampling.WeightedEpochSampler` of ``len(train_set) + len(extra_set)`` draws per
    epoch."""
    if extra_set is None and class_uniform <= 0:
        return train_set, DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                             drop_last=False)
    sources = [train_set] + ([extra_set] if extra_set is not None else [])
    shares = None
    if extra_set is not None:
        if extra_weight is None or not 0.0 < extra_weight < 1.0:
            raise ValueError(f"extra_weight must be in (0, 1), got {extra_weight}")
        shares = [1.0 - extra_weight, extra_weight]
    presence = None
    if class_uniform > 0:
        n = num_classes or train_set.num_classes
        presence = [class_presence(d, n) for d in sources]
    weights = mixing_weights([len(d) for d in sources], shares, class_uniform, presence)
    mixed = torch.utils.data.ConcatDataset(sources)
    return mixed, WeightedEpochSampler(weights, len(mixed), seed=seed, num_replicas=world, rank=rank)


def training_loss(out, mask: torch.Tensor, criterion) -> torch.Tensor:
    """The loss of one batch: ``criterion`` on the model's logits (upsampled to the mask) plus, for a dict output,
    ``w * criterion`` of each ``(w, logits)`` of its ``aux_terms`` (auxiliary heads, HMSA stage 1's scales)."""
    terms = [(1.0, extract_logits(out))]
    if isinstance(out, dict):
        terms += list(out.get("aux_terms", ()))
    loss = None
    for w, logits in terms:
        logits = logits.float()
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        term = criterion(logits, mask)
        loss = term if loss is None else loss + w * term
    return loss


def _set_train_mode(model: torch.nn.Module, frozen: list[str]) -> None:
    model.train()
    mods = dict(model.named_modules())
    for n in frozen:
        mods[n].eval()


def poly_lambda(total_steps: int, power: float = 0.9, warmup_steps: int = 0):
    """LR factor at step s: linear warm-up over ``warmup_steps``, then (1 − s/total)^power (0 at the end)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - min(step, total_steps) / max(1, total_steps)) ** power

    return f


def _build_optimizer(cfg, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _jsonable(v):
    if isinstance(v, float) and v != v:
        return None  # NaN (absent class) -> null, keeping the file strict JSON
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _log(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")


def _find_resume(cfg, out_dir: Path):
    """(weights path, state path) to resume from, or None."""
    if not cfg.resume:
        return None
    r = cfg.resume
    if r == "auto":
        w, s = out_dir / "last.safetensors", out_dir / "last.state.pt"
        return (w, s) if (w.is_file() and s.is_file()) else None
    p = Path(r)
    if p.is_dir():
        w, s = p / "last.safetensors", p / "last.state.pt"
    elif p.name.endswith(".state.pt"):
        w, s = p.with_name(p.name[: -len(".state.pt")] + ".safetensors"), p
    elif p.suffix == ".safetensors":
        w, s = p, p.with_name(p.name[: -len(".safetensors")] + ".state.pt")
    else:
        raise ValueError(f"--resume expects 'auto', an output directory, a .safetensors or a .state.pt file, "
                         f"got {r}")
    for f in (w, s):
        if not f.is_file():
            raise FileNotFoundError(f"--resume: checkpoint file not found: {f}")
    return w, s


def train(cfg) -> dict:
    """Run training as configured by ``cfg`` (the ``pyseg-train`` argparse namespace). Returns a summary dict
    (``best_miou``, ``last_val``, ``epochs_done``, ``step``, ``output_dir``)."""
    import_extra(cfg.imports)
    device = resolve_device(cfg.device)
    rank, world, local = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    try:
        summary = _train(cfg, device, rank, world)
        summary["rank"] = rank
        return summary
    finally:
        cleanup_distributed()


def _train(cfg, device, rank, world) -> dict:
    main = rank == 0
    out_dir = Path(cfg.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    log_path = out_dir / "metrics.jsonl" if main else None
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    autocast_context(device, cfg.amp)  # validates --amp for this device before any work
    resolve_mode(cfg.progress)  # and --progress
    if cfg.scale_p > 0 and cfg.crop_size is None and cfg.batch_size > 1:
        raise ValueError("random resizing (--scale-p > 0) gives images of different sizes: set --crop-size to batch "
                         "them, or --scale-p 0, or --batch-size 1")

    # --- data
    train_tf = build_train_transform(cfg.crop_size, cfg.scale_range, cfg.scale_p, cfg.hflip, cfg.color_jitter,
                                     cfg.noise_std, contrast=getattr(cfg, "contrast", 0.0))
    val_tf = build_eval_transform(size_divisor=cfg.size_divisor)
    dkw = dict(cfg.dataset_kwargs or {})
    train_set = build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, train_tf, **dkw)
    val_set = (build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, val_tf, **dkw)
               if cfg.val_split and cfg.val_every > 0 else None)
    num_classes = cfg.num_classes or train_set.num_classes
    class_names = list(train_set.classes)[:num_classes]
    extra_set = _extra_dataset(cfg, train_tf, train_set) if getattr(cfg, "extra_data", None) else None

    # --- model (identical initial weights on every rank; DDP also broadcasts rank 0's)
    torch.manual_seed(cfg.seed)
    model_kwargs = dict(cfg.model_kwargs or {})
    model = build_model(cfg.model, num_classes, model_kwargs)
    if cfg.init:
        missing, unexpected = ckpt.load_weights(model, cfg.init, strict=not cfg.init_non_strict)
        if main and (missing or unexpected):
            print(f"--init {cfg.init}: missing {len(missing)} keys, unexpected {len(unexpected)} keys")
    frozen = apply_freeze(model, cfg.freeze)
    stage = getattr(cfg, "stage", None)
    frozen += [n for n in apply_stage(model, stage) if n not in frozen]
    # stage 1 trains no attention: validate at scale 1.0 alone unless told otherwise
    val_scales = getattr(cfg, "val_scales", None) or ([1.0] if stage == 1 else None)
    if cfg.sync_bn and world > 1 and device.type == "cpu":
        raise ValueError("--sync-bn needs CUDA devices: torch.nn.SyncBatchNorm has no CPU implementation")
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.find_unused_parameters)
    # augmentation / dropout randomness differs per rank
    torch.manual_seed(cfg.seed + 1000 * rank + 1)
    np.random.seed((cfg.seed + 1000 * rank + 1) % 2**32)
    import random

    random.seed(cfg.seed + 1000 * rank + 1)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter is frozen; nothing to train")
    optimizer = _build_optimizer(cfg, params)
    loss_kw = {}
    if cfg.loss == "bootstrap":
        loss_kw = dict(k=cfg.bootstrap_k, thresh=cfg.bootstrap_thresh)
    criterion = build_loss(cfg.loss, ignore_index=255, num_classes=num_classes, **loss_kw).to(device)

    train_set, sampler = build_train_sampler(train_set, extra_set, getattr(cfg, "extra_weight", None),
                                             float(getattr(cfg, "class_uniform", 0.0) or 0.0), num_classes,
                                             cfg.seed, world, rank)
    drop_last = len(sampler) >= cfg.batch_size
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=drop_last, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                        persistent_workers=False)
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=cfg.val_batch_size, sampler=ShardSampler(len(val_set)),
                                num_workers=cfg.workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images, {len(sampler)} per process) gives no batch "
                         f"of size {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    poly_power = 0.9 if cfg.poly_power is None else cfg.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total_steps, poly_power, cfg.warmup_steps))
    use_scaler = cfg.amp == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_epoch, step, best = 0, 0, float("-inf")
    found = _find_resume(cfg, out_dir)
    if found is not None:
        wpath, spath = found
        state = ckpt.load_state(spath)
        meta = ckpt.read_metadata(wpath)
        if int(meta.get("step", -1)) != int(state["step"]):
            raise RuntimeError(f"checkpoint mismatch: {wpath} is at step {meta.get('step')} but {spath} at step "
                               f"{state['step']}")
        ckpt.load_weights(model, wpath)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best = float(state.get("best_metric", float("-inf")))
        rngs = state.get("rng") or []
        if len(rngs) == world:
            ckpt.set_rng_state(rngs[rank])
        elif main:
            print(f"resume: checkpoint was written by {len(rngs)} process(es), now {world}; RNG streams reseeded")
        if main:
            print(f"resumed from {wpath} (epoch {start_epoch}, step {step}, best mIoU {best:.4f})")

    meta_base = {"model": cfg.model, "num_classes": num_classes, "model_kwargs": model_kwargs,
                 "classes": class_names, "dataset": cfg.dataset}
    if stage is not None:
        meta_base["stage"] = stage

    def save(tag: str, epoch_done: int):
        rngs = all_gather_object(ckpt.rng_state())  # collective: every rank
        if main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if use_scaler else None, "epoch": epoch_done, "step": step,
                     "best_metric": best, "rng": rngs, "world_size": world, "args": vars(cfg)}
            ckpt.save_weights(model, out_dir / f"{tag}.safetensors",
                              {**meta_base, "step": step, "epoch": epoch_done})
            ckpt.save_state(state, out_dir / f"{tag}.state.pt")
        barrier()

    if main:
        n_train = sum(p.numel() for p in params)
        extra = f" + {len(extra_set)} extra (share {cfg.extra_weight:g})" if extra_set is not None else ""
        staged = f", stage {stage}" if stage is not None else ""
        print(f"pyseg-train: model {cfg.model} ({n_train:,} trainable params{staged}), {num_classes} classes, "
              f"{len(train_set) - (len(extra_set) if extra_set is not None else 0)} train images{extra}, world size "
              f"{world}, device {device}, {steps_per_epoch} steps/epoch, {total_steps} steps")
    last_val = None
    epochs_run = 0
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after_epochs is not None and epochs_run >= cfg.stop_after_epochs:
            break
        sampler.set_epoch(epoch)
        _set_train_mode(model, [f"module.{n}" if isinstance(model, DDP) else n for n in frozen])
        t0 = time.time()
        loss_sum, n_steps = 0.0, 0
        bar = progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", mode=cfg.progress, enabled=main)
        for image, mask in bar:
            image = image.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            with autocast_context(device, cfg.amp):
                out = model(image)
            loss = training_loss(out, mask, criterion)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            lv = float(loss.detach())
            loss_sum += lv
            n_steps += 1
            if main:
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if cfg.log_every and step % cfg.log_every == 0:
                _log(log_path, {"type": "step", "epoch": epoch + 1, "step": step, "loss": lv,
                                "lr": scheduler.get_last_lr()[0]})
        epoch_loss = reduce_mean(loss_sum / max(1, n_steps), device)
        epochs_run += 1
        rec = {"type": "train", "epoch": epoch + 1, "step": step, "loss": epoch_loss,
               "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t0, 3)}
        _log(log_path, rec)
        if main:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f} ({rec['time_s']:.1f} s)")
        is_last = epoch + 1 == cfg.epochs
        if val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or is_last):
            res = evaluate(model, val_loader, num_classes, device, amp=cfg.amp, size_divisor=cfg.size_divisor,
                           progress=cfg.progress, desc="val", scales=val_scales)
            last_val = res
            _log(log_path, {"type": "val", "epoch": epoch + 1, "step": step, **res})
            if main:
                print(f"epoch {epoch + 1}: val mIoU {res['miou']:.4f}, pixel acc {res['pixel_acc']:.4f}")
            if res["miou"] > best:
                best = res["miou"]
                save("best", epoch + 1)
        if (epoch + 1) % cfg.ckpt_every == 0 or is_last or (
                cfg.stop_after_epochs is not None and epochs_run >= cfg.stop_after_epochs):
            save("last", epoch + 1)
    return {"best_miou": best if best != float("-inf") else None, "last_val": last_val,
            "epochs_done": start_epoch + epochs_run, "step": step, "output_dir": str(out_dir),
            "num_classes": num_classes}
