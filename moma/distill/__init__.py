"""Distillation methods, one file each, registered by name with ``@register_method``.

To add a method: write ``moma/distill/<name>.py`` with a :class:`DistillMethod` subclass, import it
below (the registry line), and add its test.
"""

from moma.distill.base import Batch, DistillMethod, MethodContext, MethodParams
from moma.distill.registry import all_methods, get_method, method_names, register_method

# Registry lines: importing a module registers its method.
from moma.distill import none  # noqa: E402,F401
from moma.distill import kd  # noqa: E402,F401

__all__ = ["Batch", "DistillMethod", "MethodContext", "MethodParams", "all_methods", "get_method", "method_names", "register_method"]
