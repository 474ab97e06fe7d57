"""The method registry: every concrete counterfactual method of :mod:`lit_cf.explainers`.

A method registers itself by being a concrete subclass of
:class:`~lit_cf.explainers.base.CounterfactualMethod` in a module of this package: the registry
imports every module here and collects them, so adding a method is one file (plus its
``configs/explain/*.yaml``). Bases that are not methods set ``abstract = True`` in their class
body. Names are the ``method_name`` class attribute, or the class name in snake case.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod


def _snake(name: str) -> str:
    name = re.sub(r"Counterfactual$", "", name) or name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def method_name(cls: type[CounterfactualMethod]) -> str:
    """The registry name of a method class (``method_name`` or its class name in snake case)."""
    return cls.__dict__.get("method_name") or _snake(cls.__name__)


def method_registry() -> dict[str, type[CounterfactualMethod]]:
    """``{name: class}`` of every concrete method defined in :mod:`lit_cf.explainers`, sorted by name."""
    import lit_cf.explainers as package

    # only the package's own modules are imported (a fixed, installed list; nothing read from a file)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found: dict[str, type[CounterfactualMethod]] = {}
    stack = list(CounterfactualMethod.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__dict__.get("abstract", False) or not cls.__module__.startswith(package.__name__ + "."):
            continue
        name = method_name(cls)
        if name in found and found[name] is not cls:
            raise RuntimeError(f"two methods are registered as {name!r}: {found[name].__qualname__} and {cls.__qualname__}")
        found[name] = cls
    return dict(sorted(found.items()))


def method_class(name: str) -> type[CounterfactualMethod]:
    """The method class registered as ``name``; a clear error lists the registered names."""
    registry = method_registry()
    if name not in registry:
        raise UserError(f"unknown method {name!r}; registered methods: {', '.join(registry)}")
    return registry[name]


__all__ = ["method_class", "method_name", "method_registry"]
