"""How the counterfactuals of a run were stopped: the rule the method recorded, in words.

A counterfactual that stops the moment it crosses the decision boundary (a low per-image
threshold) is an adversarial example more often than one optimised for its whole budget, so
evaluate shows, next to the mean steps (``steps_mean``) and the mean final target probability
(``tconf_mean``), the rule each run stopped its images by (``stopping``).
"""

from __future__ import annotations

from typing import Any


def stopping_rule_of(method: dict[str, Any] | None) -> str:
    """The ``stopping`` entry of a run's method record; derived from its settings for older runs."""
    method = method or {}
    if method.get("stopping"):
        return str(method["stopping"])
    steps = method.get("steps")
    if "stages" in method and "stage_rule" not in method:  # DISC before the stage rule existed
        stages = method["stages"] if method.get("progressive", True) else method["stages"][-1:]
        return f"per image at each stage's target probability ({', '.join(f'{v:g}' for v in stages)})"
    for key in ("stop_probability", "threshold"):
        if key in method:
            value = method[key]
            if value is None:
                return f"none: every image runs {steps} steps"
            return f"per image at p(target) >= {float(value):g}, at most {steps} steps"
    return "not recorded"


def stopping_summary(run: Any) -> dict[str, Any]:
    """``{"stopping": rule}`` of an :class:`~lit_cf.explainers.ExplainRun`."""
    return {"stopping": stopping_rule_of(run.meta.get("method"))}


__all__ = ["stopping_rule_of", "stopping_summary"]
