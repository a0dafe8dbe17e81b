"""moma-distill: knowledge distillation for histopathology tile classifiers.

The headline method is MoMA (Vuong & Kwak, Medical Image Analysis 101 (2025) 103421, arXiv 2308.16561);
the classic distillation baselines live beside it in :mod:`moma.distill`.
"""

__version__ = "0.1.0"
