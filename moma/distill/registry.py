"""Registry of distillation methods, filled by the ``@register_method`` decorator."""

from __future__ import annotations

from typing import TypeVar

from moma.errors import ConfigError

_METHODS: dict[str, type] = {}
T = TypeVar("T")


def register_method(cls: type[T]) -> type[T]:
    """Class decorator: make a :class:`~moma.distill.base.DistillMethod` selectable by its ``name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} needs a non-empty 'name' to be registered")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"distillation method '{name}' is registered twice ({_METHODS[name].__name__}, {cls.__name__})")
    _METHODS[name] = cls
    return cls


def get_method(name: str) -> type:
    key = name.lower()
    if key not in _METHODS:
        raise ConfigError(f"distill.method '{name}' is unknown; choose one of: {', '.join(sorted(_METHODS))} (see `moma methods`)")
    return _METHODS[key]


def method_names() -> list[str]:
    return sorted(_METHODS)


def all_methods() -> dict[str, type]:
    return dict(sorted(_METHODS.items()))


def not_applicable_reason(cls: type, teacher_classes: list[str] | None, classes: list[str] | None = None) -> str | None:
    """Why method ``cls`` cannot run with a teacher of ``teacher_classes`` (None: no teacher) on data
    of ``classes`` (None: not known yet), or None if it can. The builder refuses such a run; the
    comparison grid records the cell as not applicable."""
    if teacher_classes is None:
        return f"'{cls.name}' needs a teacher" if cls.requires_teacher else None
    if cls.needs_teacher_classes and not teacher_classes:
        return (f"'{cls.name}' needs the teacher's class outputs, but the teacher is features-only "
                "(imported without a classifier)")
    if cls.needs_teacher_classes and classes is not None and sorted(teacher_classes) != sorted(classes):
        return (f"'{cls.name}' uses the teacher's class outputs (logits or classifier), so it needs a teacher "
                f"trained on the same classes (teacher: {', '.join(teacher_classes)}; data: {', '.join(classes)})")
    return None


def applicable_methods(teacher_classes: list[str] | None, classes: list[str] | None = None) -> list[str]:
    """The registered methods that can run with this teacher on this data."""
    return [name for name, cls in all_methods().items() if not_applicable_reason(cls, teacher_classes, classes) is None]


def method_requirements(cls: type) -> str:
    """What a method needs from the teacher, in words."""
    if cls.needs_teacher_classes:
        needs = "same classes as the teacher"
    else:
        needs = "any teacher" if cls.requires_teacher else "no teacher"
    return needs + (", same architecture" if cls.requires_same_architecture(cls.Params()) else "")


def method_defaults(cls: type) -> str:
    """Default loss weights, parameters and requirements of a method, on one line."""
    resolved = cls.Params().model_dump()  # as a run gets them (presets filled in)
    params = ", ".join(f"{name}={value}" for name, value in resolved.items())
    weights = f"ce={cls.default_ce_weight:g}, kl={cls.default_kl_weight:g}"
    return f"{weights}; {params or 'no parameters'}; needs: {method_requirements(cls)}"


def methods_markdown(methods: dict[str, type]) -> str:
    """The method table of docs/methods.md (``moma methods --markdown``)."""
    lines = ["| method | what it does | reference | defaults |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {cls.summary} | {cls.reference} | {method_defaults(cls)} |" for name, cls in methods.items()]
    return "\n".join(lines)
