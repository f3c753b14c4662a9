"""Command-line entry points: ``pyseg-train`` (``python -m pyseg.train``), ``pyseg-eval``, ``pyseg-predict``."""
