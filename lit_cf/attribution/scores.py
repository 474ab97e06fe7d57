"""Local and global counterfactual attributions (Goldwasser & Hooker, 2025).

With descriptor predictors ``P_j`` (:mod:`lit_cf.attribution.predictors`, or any image-based
descriptor model) applied to a query and its counterfactual:

* local score of descriptor ``j``: ``s_j = P_j(cf) - P_j(query)``; an explanation shows the
  top-k descriptors by ``|s_j|`` with their signs (:func:`local_attributions`);
* global score: the mean over counterfactuals of ``sign * s_j``, ``sign = +1`` when the
  counterfactual moves *towards* the class of interest and ``-1`` when it moves *away* from
  it; descriptors are ranked by the magnitude of the mean, with percentile bootstrap
  confidence intervals (:func:`global_attribution`), overall or per class of interest.

:func:`attribute_run` computes both for a finished ``lit-cf explain`` run, from the saved
latents of latent methods (cheap: nothing is re-encoded) or from the images of any method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_cf.attribution.predictors import LinearPredictors
from lit_cf.errors import UserError

__all__ = ["Ranking", "attribute_run", "global_attribution", "local_attributions"]

#: one global ranking: ``(name, score, ci_low, ci_high)`` rows sorted by ``|score|``
Ranking = list[tuple[str, float, float, float]]


def _check_pair(desc_query: Tensor, desc_cf: Tensor, names: Sequence[str]) -> None:
    if desc_query.dim() != 2 or desc_query.shape != desc_cf.shape:
        raise ValueError(
            f"descriptors of queries and counterfactuals must both be [N, A], got {tuple(desc_query.shape)} "
            f"and {tuple(desc_cf.shape)}"
        )
    if len(names) != desc_query.shape[1]:
        raise ValueError(f"{len(names)} names for {desc_query.shape[1]} descriptors")


def local_attributions(desc_query: Tensor, desc_cf: Tensor, names: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per counterfactual, the top-``k`` descriptors by ``|s_j|``, ``s_j = P_j(cf) - P_j(query)``.

    Returns one list per row of ``(name, s_j)`` in decreasing ``|s_j|`` (ties keep the column
    order); the sign says in which direction the descriptor changed.
    """
    _check_pair(desc_query, desc_cf, names)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = (desc_cf.detach().double() - desc_query.detach().double()).cpu()
    order = s.abs().sort(dim=1, descending=True, stable=True).indices[:, :k]
    return [[(names[j], float(s[i, j])) for j in row.tolist()] for i, row in enumerate(order)]


def _bootstrap(contrib: Tensor, n_boot: int, seed: int, ci: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mean ``[A]`` of ``contrib [N, A]`` and its percentile bootstrap interval.

    All resamples at once: an ``[n_boot, N]`` matrix of indices drawn with replacement is
    turned into per-resample counts, so the resampled means are one matrix product
    (``[n_boot, N] @ [N, A]``) without materialising ``n_boot`` copies of the data.
    """
    n = contrib.shape[0]
    mean = contrib.mean(0)
    if n_boot < 1:
        return mean, torch.full_like(mean, float("nan")), torch.full_like(mean, float("nan"))
    g = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
    idx = torch.randint(n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=contrib.dtype).scatter_add_(1, idx, torch.ones_like(idx, dtype=contrib.dtype))
    boots = counts @ contrib / n  # [n_boot, A]
    alpha = (1 - ci) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=contrib.dtype)
    lo, hi = torch.quantile(boots, q, dim=0)
    return mean, lo, hi


def _ranking(names: Sequence[str], mean: Tensor, lo: Tensor, hi: Tensor) -> Ranking:
    order = mean.abs().sort(descending=True, stable=True).indices.tolist()
    return [(names[j], float(mean[j]), float(lo[j]), float(hi[j])) for j in order]


def global_attribution(
    desc_query: Tensor,
    desc_cf: Tensor,
    signs: Tensor | None,
    names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    group: Tensor | None = None,
    ci: float = 0.95,
) -> Ranking | dict[int, Ranking]:
    """Global descriptor ranking: mean of ``sign * (P_j(cf) - P_j(query))`` over counterfactuals.

    Args:
        desc_query: ``[N, A]`` descriptor predictions of the queries.
        desc_cf: ``[N, A]`` descriptor predictions of their counterfactuals.
        signs: ``[N]`` ``+1`` (the counterfactual moves towards the class of interest) or
            ``-1`` (away from it); ``None`` means all ``+1``.
        names: Descriptor names.
        n_boot: Bootstrap resamples for the confidence intervals (0: intervals are NaN).
        seed: Seed of the resampling; the same seed gives the same intervals.
        group: Optional ``[N]`` integer class of interest per counterfactual: then one ranking
            per class is returned as ``{class: ranking}``, each resampled within its class from
            its own seeded generator (independent of the other classes).
        ci: Coverage of the percentile interval (default 95%).

    Returns:
        ``[(name, score, ci_low, ci_high), ...]`` sorted by ``|score|`` (largest first), or a
        dict of them per class when ``group`` is given.
    """
    _check_pair(desc_query, desc_cf, names)
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n = desc_query.shape[0]
    if n == 0:
        raise ValueError("no counterfactuals to attribute")
    diff = (desc_cf.detach().double() - desc_query.detach().double()).cpu()
    if signs is None:
        signs = torch.ones(n, dtype=torch.float64)
    signs = torch.as_tensor(signs).double().cpu().flatten()
    if signs.shape[0] != n:
        raise ValueError(f"signs must be [N={n}], got {tuple(signs.shape)}")
    if not ((signs == 1) | (signs == -1)).all():
        raise ValueError("signs must be +1 (towards the class) or -1 (away from it)")
    contrib = signs[:, None] * diff
    if group is None:
        return _ranking(names, *_bootstrap(contrib, n_boot, seed, ci))
    group = torch.as_tensor(group).long().cpu().flatten()
    if group.shape[0] != n:
        raise ValueError(f"group must be [N={n}], got {tuple(group.shape)}")
    out: dict[int, Ranking] = {}
    for c in sorted(set(group.tolist())):
        rows = group == c
        out[c] = _ranking(names, *_bootstrap(contrib[rows], n_boot, seed * 1_000_003 + c, ci))
    return out


# ----------------------------------------------------------------------------- explain runs
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, device: torch.device | None) -> Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            out.append(fn(chunk.to(device) if device is not None else chunk).detach().float().cpu())
    return torch.cat(out)


def _has_tensor(run: Any, key: str) -> bool:
    """Whether the run saved tensor ``key``: asked through :class:`lit_cf.runs.ExplainRun`
    (which verifies the shard it reads), or, for another run-like object, by reading it."""
    has = getattr(run, "has_tensor", None)
    if callable(has):
        return bool(has(key))
    try:
        run.tensor(key)
    except UserError:
        return False
    return True


def attribute_run(
    run: Any,
    predictor_fn: LinearPredictors | torch.nn.Module | Callable[[Tensor], Tensor],
    names: Sequence[str] | None = None,
    k: int = 5,
    inputs: str = "auto",
    successful_only: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    before: str | None = None,
) -> dict[str, Any]:
    """Local and global attributions of a finished explain run (:class:`lit_cf.runs.ExplainRun`).

    Descriptors are predicted either from latents or from images (``inputs``):

    * ``"latent"``: ``predictor_fn`` reads the saved initial and final latent codes
      (``latent_init`` and ``latent`` tensors of latent methods such as
      :class:`lit_cf.explainers.LatentAttack`); nothing is re-encoded. Typical predictor: a
      :class:`LinearPredictors` fitted on codes of the same generator.
    * ``"image"``: ``predictor_fn`` reads the ``query`` and ``counterfactual`` images; works
      for every method. Typical predictor: a :class:`lit_cf.models.DescriptorPredictor`
      (its ``predict_descriptors`` is used) or any callable ``[B, C, H, W] -> [B, A]``.
    * ``"auto"``: latents when the predictor is a :class:`LinearPredictors` and the run saved
      latents, images otherwise.

    Signs and classes of interest: a counterfactual moves towards its target class (sign +1,
    class of interest = target), except in runs of a method with ``decreasing: true`` (a
    binary attribute being decreased), where the class of interest is the source class
    ``1 - target`` and the sign is -1.

    Args:
        run: A finished explain run (``.manifest`` rows and ``.tensor(name)``).
        predictor_fn: The descriptor predictor (see above).
        names: Descriptor names (default: the predictor's ``names``).
        k: Descriptors per local explanation.
        inputs: ``"auto"``, ``"latent"`` or ``"image"``.
        successful_only: Attribute only the counterfactuals that reached their target class
            (``success`` in the manifest); a failed one did not cross the decision boundary.
        n_boot: Bootstrap resamples of the global intervals.
        seed: Bootstrap seed.
        batch_size: Images or latents per predictor call.
        device: Device of the predictor calls (default: the predictor's, else CPU).
        before: The saved tensor the counterfactual is compared with (default: ``query`` for
            images, ``latent_init`` for latents), e.g. ``prior_image``: the image DISC's fitted
            prior renders before its first step, so that the score is the edit the method
            made, without the prior's reconstruction error.

    Returns:
        ``{"inputs", "records", "local", "global", "per_class", "desc_query", "desc_cf"}``:
        the record numbers attributed, one top-k list per record, the overall ranking, the
        rankings per class of interest, and the descriptor predictions.
    """
    if inputs not in ("auto", "latent", "image"):
        raise ValueError(f"inputs must be 'auto', 'latent' or 'image', got {inputs!r}")
    if names is None:
        names = getattr(predictor_fn, "names", None)
        if names is None:
            raise ValueError("pass names: the predictor does not carry descriptor names")
    names = list(names)
    if inputs == "auto":
        inputs = "latent" if isinstance(predictor_fn, LinearPredictors) and _has_tensor(run, "latent") else "image"
    fn: Callable[[Tensor], Tensor]
    dev: torch.device | None
    if isinstance(predictor_fn, LinearPredictors):
        fn = predictor_fn.predict
        dev = torch.device(device) if device is not None else predictor_fn.weight.device
    elif callable(predict_descriptors := getattr(predictor_fn, "predict_descriptors", None)):
        if isinstance(predictor_fn, torch.nn.Module):
            predictor_fn.eval()
        fn = predict_descriptors
        first = next(predictor_fn.parameters(), None) if isinstance(predictor_fn, torch.nn.Module) else None
        dev = torch.device(device) if device is not None else (first.device if first is not None else None)
    elif callable(predictor_fn):
        fn, dev = predictor_fn, torch.device(device) if device is not None else None
    else:
        raise TypeError(f"predictor_fn must be LinearPredictors, a descriptor model or a callable, got {type(predictor_fn)}")

    keys = ("latent_init", "latent") if inputs == "latent" else ("query", "counterfactual")
    if inputs == "latent" and not _has_tensor(run, "latent"):
        raise UserError("this run saved no latents (not a latent method): attribute it with inputs='image'")
    if before is not None:
        if not _has_tensor(run, before):
            raise UserError(f"this run saved no tensor {before!r} to compare the counterfactuals with")
        keys = (before, keys[1])
    rows = run.manifest
    keep = [i for i, r in enumerate(rows) if r.get("success", True) or not successful_only]
    if not keep:
        raise UserError("no successful counterfactuals in this run to attribute (or pass successful_only=False)")
    sel = torch.tensor(keep)
    x_before, x_after = run.tensor(keys[0])[sel], run.tensor(keys[1])[sel]
    desc_query = _batched(fn, x_before, batch_size, dev)
    desc_cf = _batched(fn, x_after, batch_size, dev)

    method = (getattr(run, "meta", None) or {}).get("method", {})
    targets = torch.tensor([rows[i]["target"] for i in keep])
    if method.get("decreasing"):
        signs, interest = -torch.ones(len(keep)), 1 - targets
    else:
        signs, interest = torch.ones(len(keep)), targets
    return {
        "inputs": inputs,
        "records": [rows[i]["record"] for i in keep],
        "local": local_attributions(desc_query, desc_cf, names, k),
        "global": global_attribution(desc_query, desc_cf, signs, names, n_boot=n_boot, seed=seed),
        "per_class": global_attribution(desc_query, desc_cf, signs, names, n_boot=n_boot, seed=seed, group=interest),
        "desc_query": desc_query,
        "desc_cf": desc_cf,
    }
