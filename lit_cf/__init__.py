"""lit-cf: train image classifiers and explain them with visual counterfactuals."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # lazy: `import lit_cf` stays light; `lit_cf.explain(...)` is the notebook API
    if name == "explain":
        from lit_cf.api import explain

        return explain
    raise AttributeError(f"module 'lit_cf' has no attribute {name!r}")


__all__ = ["__version__", "explain"]
