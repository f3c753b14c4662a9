"""``python -m pyseg.train`` (same as ``pyseg-train``; works under ``torchrun -m pyseg.train``)."""
from pyseg.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
