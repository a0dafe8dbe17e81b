"""Distillation methods, one file each, registered by name with ``@register_method``.

To add a method: write ``moma/distill/<name>.py`` with a :class:`DistillMethod` subclass, import it
below (the registry line), add its test, and regenerate docs/methods.md's table with
``python scripts/update_methods_doc.py``.
"""

from moma.distill.base import Batch
from moma.distill.registry import all_methods, get_method, method_names

# Registry lines: importing a module registers its method.
from moma.distill import none  # noqa: E402,F401
from moma.distill import kd  # noqa: E402,F401
from moma.distill import pseudo  # noqa: E402,F401
from moma.distill import fixmatch  # noqa: E402,F401
from moma.distill import crd  # noqa: E402,F401
from moma.distill import semckd  # noqa: E402,F401
from moma.distill import simkd  # noqa: E402,F401
from moma.distill import dkd  # noqa: E402,F401
from moma.distill import fitnet  # noqa: E402,F401
from moma.distill import at  # noqa: E402,F401
from moma.distill import sp  # noqa: E402,F401
from moma.distill import cc  # noqa: E402,F401
from moma.distill import rkd  # noqa: E402,F401
from moma.distill import pkt  # noqa: E402,F401
from moma.distill import vid  # noqa: E402,F401
from moma.distill import moma  # noqa: E402,F401

__all__ = ["Batch", "all_methods", "get_method", "method_names"]
