"""The handlers of the ``moma`` sub-commands, one module per group: training (``training.py``),
model files (``checkpoints.py``) and whole slides (``slides.py``); the parser that dispatches to
them is ``moma/cli.py``."""
