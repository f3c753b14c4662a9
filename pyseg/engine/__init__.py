"""Training, evaluation and inference engine (used by the ``pyseg-train/-eval/-predict`` commands)."""
from .checkpoint import load_weights, read_metadata, save_weights
from .evaluator import autocast_context, evaluate
from .inference import configure_scales, extract_logits, forward_logits, predict_scores
from .trainer import apply_freeze, poly_lambda, train

__all__ = ["load_weights", "read_metadata", "save_weights", "autocast_context", "evaluate", "configure_scales",
           "extract_logits", "forward_logits", "predict_scores", "apply_freeze", "poly_lambda", "train"]
