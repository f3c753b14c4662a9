"""Training, evaluation and inference engine (used by the ``pyseg-train/-eval/-predict`` commands)."""
from .checkpoint import load_weights, read_metadata, save_weights
from .evaluator import autocast_context, evaluate
from .inference import (configure_scales, extract_logits, forward_logits, predict_labels, predict_probabilities,
                        predict_scores)
from .build import build_model, import_extra, resolve_device

_TRAINER = ("apply_freeze", "apply_stage", "build_train_sampler", "poly_lambda", "train", "training_loss")


def __getattr__(name):
    # the trainer (DDP, optimisers, data loaders) is imported only by those who train
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_weights", "read_metadata", "save_weights", "autocast_context", "evaluate", "configure_scales",
           "extract_logits", "forward_logits", "predict_scores", "predict_probabilities", "predict_labels",
           "apply_freeze", "apply_stage", "build_train_sampler", "poly_lambda", "train", "training_loss", "build_model",
           "import_extra", "resolve_device"]
