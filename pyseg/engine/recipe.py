"""Training recipes: several ``pyseg-train`` runs in a row, each starting from the previous one's best weights.

``hmsa-staged`` — the hierarchical multi-scale attention slides' schedule for training on one GPU:

1. trunk and segmentation head, per scale, without attention (Adam, lr 1e-3);
2. trunks and heads frozen, the attention head trained (lr 5e-4);
3. attention frozen, trunks and heads fine-tuned (lr 1e-4);

each with poly decay of power 0.8 (``--poly-power`` overrides), the loss chosen by ``--loss`` (CE, RMI, ...). Step 1
validates at scale 1.0 alone (its attention head is untrained), the others at ``--val-scales``. A
step is an ordinary training run with ``--stage N`` (:func:`pyseg.engine.trainer.apply_stage`) and ``--init`` set
to the previous step's best weights (its last ones when it did not validate).

Output folder layout::

    OUT/step1/  best.safetensors, last.*, metrics.jsonl     (step 1's run; likewise step2/, step3/)
    OUT/recipe.json                                        the steps' settings, results and which are done
    OUT/best.safetensors                                   a copy of the last step's best weights

Resuming (``--resume auto``) skips the steps ``recipe.json`` marks done and continues the current step from its
``last`` checkpoint, so a run interrupted anywhere (``--stop-after-epochs``, a crash after a checkpoint) picks
up where it stopped. Without ``--resume`` every step starts afresh.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..nn.hmsa import STAGE_LR
from .checkpoint import _atomic

__all__ = ["RECIPES", "RecipeStep", "run_recipe"]


@dataclass(frozen=True)
class RecipeStep:
    stage: int
    lr: float
    description: str


#: recipe name -> (steps, poly power)
RECIPES = {
    "hmsa-staged": ((RecipeStep(1, STAGE_LR[1], "trunk + segmentation head per scale, no attention"),
                     RecipeStep(2, STAGE_LR[2], "trunks and heads frozen, attention trained"),
                     RecipeStep(3, STAGE_LR[3], "attention frozen, trunks and heads fine-tuned")), 0.8),
}

STATE_FILE = "recipe.json"


def _write_json(path: Path, record: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    _atomic(path, write)


def _copy(src: Path, dst: Path) -> None:
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def run_recipe(cfg) -> dict:
    """Run recipe ``cfg.recipe`` with the ``pyseg-train`` options ``cfg`` (per-step epochs ``cfg.step_epochs``,
    learning rates ``cfg.step_lr``, default the recipe's); returns ``recipe.json``'s record, whose ``finished``
    says whether every step ran to its end (``--stop-after-epochs`` stops inside a step)."""
    from .trainer import train

    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown --recipe {cfg.recipe!r}; expected one of {', '.join(RECIPES)}")
    steps, poly_power = RECIPES[cfg.recipe]
    epochs = list(cfg.step_epochs or [cfg.epochs] * len(steps))
    lrs = list(cfg.step_lr or [s.lr for s in steps])
    if len(epochs) != len(steps) or len(lrs) != len(steps):
        raise ValueError(f"--recipe {cfg.recipe} has {len(steps)} steps: give {len(steps)} values to --step-epochs "
                         f"and --step-lr")
    if cfg.resume not in (None, "auto"):
        raise ValueError("--recipe resumes with --resume auto (the recipe's output folder knows which step is next)")
    out = Path(cfg.output_dir)
    state_path = out / STATE_FILE
    record = None
    if cfg.resume == "auto" and state_path.is_file():
        record = json.loads(state_path.read_text())
        if record.get("recipe") != cfg.recipe:
            raise ValueError(f"{state_path} is a {record.get('recipe')!r} run, not {cfg.recipe!r}")
    if record is None:
        record = {"recipe": cfg.recipe, "model": cfg.model, "poly_power": poly_power, "finished": False,
                  "steps": [{"step": i + 1, "stage": s.stage, "description": s.description, "lr": lrs[i],
                             "epochs": epochs[i], "done": False} for i, s in enumerate(steps)]}
    init = cfg.init
    rank = 0
    for i, step in enumerate(steps):
        entry = record["steps"][i]
        step_dir = out / f"step{i + 1}"
        if entry["done"]:
            init = str(out / entry["weights"])
            continue
        step_cfg = copy.copy(cfg)
        step_cfg.recipe = None
        step_cfg.output_dir = str(step_dir)
        step_cfg.stage, step_cfg.lr, step_cfg.epochs = step.stage, lrs[i], epochs[i]
        step_cfg.poly_power = poly_power if cfg.poly_power is None else cfg.poly_power
        step_cfg.init = init
        if step.stage == 1:  # no attention trained yet: validate scale 1.0 alone
            step_cfg.val_scales = [1.0]
        step_cfg.init_non_strict = cfg.init_non_strict if i == 0 else False
        resume_step = cfg.resume == "auto" and (step_dir / "last.state.pt").is_file()
        step_cfg.resume = "auto" if resume_step else None
        summary = train(step_cfg)
        rank = summary.get("rank", 0)
        if summary["epochs_done"] < epochs[i]:  # stopped inside the step: resume later
            return record
        best = step_dir / "best.safetensors"
        weights = best if best.is_file() else step_dir / "last.safetensors"
        entry.update(done=True, best_miou=summary["best_miou"], weights=str(weights.relative_to(out)),
                     last_val_miou=(summary["last_val"] or {}).get("miou"))
        if rank == 0:
            _write_json(state_path, record)
            print(f"recipe {cfg.recipe}: step {i + 1}/{len(steps)} ({step.description}) done, best val mIoU "
                  f"{summary['best_miou'] if summary['best_miou'] is not None else 'n/a'}")
        init = str(weights)
    record["finished"] = True
    if rank == 0:
        _copy(Path(init), out / "best.safetensors")
        _write_json(state_path, record)
    return record
