"""Realism of counterfactuals: FID and sFID on an in-project feature network, DUQ certainty.

No Inception weights exist here, so the Fréchet distances use a network lit-cf trained on the
same data and are reported as ``fid_domain`` / ``sfid_domain``: comparable between methods
evaluated with the same network, never with published FID numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, EvalOnly, check_images, mean_std_dict
from lit_cf.metrics.features import infer_num_features


class FIDFeatures(nn.Module):
    """Adapter making any image network a torchmetrics FID feature extractor.

    torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` accepts an
    ``nn.Module`` as ``feature``; it passes the images to it unchanged (its ``normalize`` flag
    only matters for the built-in Inception) and reads the feature dimension from a
    ``num_features`` attribute (else it probes with a dummy image). This adapter keeps the
    network in eval mode, runs it without gradients, flattens its output to ``[B, d]`` and
    exposes ``num_features``.

    ``num_features`` is resolved in this order: the argument, the network's ``num_features``,
    its ``out_features`` (lit-cf backbones), a probe with a random image of ``input_shape``.
    """

    def __init__(
        self,
        network: nn.Module,
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.network = EvalOnly(network)
        if num_features is None:
            num_features = getattr(network, "num_features", None) or getattr(network, "out_features", None)
        if num_features is None and input_shape is not None:
            num_features = infer_num_features(network, input_shape)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"cannot tell the feature dimension of {type(network).__name__}: pass num_features "
                "(or input_shape=(C, H, W) to probe it)"
            )
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.network(x)
        out = out.flatten(1)
        if out.shape[1] != self.num_features:
            raise ValueError(f"feature network returned {out.shape[1]} features, expected {self.num_features}")
        return out


class DomainFID(FrechetInceptionDistance):
    """FID on an in-project feature network (``fid_domain``), built on torchmetrics' FID.

    ``update(imgs, real: bool)`` as in torchmetrics: feed real images (queries or held-out real
    images) with ``real=True`` and counterfactuals with ``real=False``. Images are passed to
    the network as given (float, normally in ``[0, 1]``), not converted to ``uint8``. States are
    float64 feature sums and outer-product sums reduced with ``sum`` (DDP-safe).

    Args:
        feature_extractor: Network mapping images to features (flattened to ``[B, d]``), e.g.
            :class:`~lit_cf.metrics.features.ClassifierFeatures` of a trained classifier.
        num_features: ``d``; inferred when possible (see :class:`FIDFeatures`).
        input_shape: ``(C, H, W)`` used to probe ``d`` when it cannot be read off the network.
        reset_real_features: Whether ``reset()`` also clears the real-image statistics.
        name: Output key.

    ``compute() -> {"fid_domain": Tensor}``; ``nan`` when either set has fewer than 2 images.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        reset_real_features: bool = True,
        name: str = "fid_domain",
        **kwargs: Any,
    ) -> None:
        adapter = FIDFeatures(feature_extractor, num_features, input_shape)
        super().__init__(feature=adapter, reset_real_features=reset_real_features, normalize=True, **kwargs)
        self.name = name
        self.orig_dtype = torch.float32  # torchmetrics sets it on update; compute may come first

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            return {self.name: torch.tensor(float("nan"), device=self.real_features_sum.device)}
        return {self.name: super().compute().float()}


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`` in float64.

    The trace of the matrix square root is computed as ``sum sqrt(eig(S cov2 S))`` with
    ``S = cov1^(1/2)``, a symmetric positive semi-definite matrix with the same eigenvalues as
    ``cov1 cov2`` (``eigh`` instead of a general eigen-solver; tiny negative eigenvalues from
    round-off are clipped to 0).
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    w1, v1 = symmetric_eigh(cov1)
    sqrt1 = (v1 * w1.clamp_min(0).sqrt()) @ v1.T
    trace_sqrt = symmetric_eigh(sqrt1 @ cov2 @ sqrt1)[0].clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt


def symmetric_eigh(m: Tensor, tries: int = 6) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of ``m``, robust to LAPACK's convergence failures.

    Covariances of few samples in many dimensions are rank-deficient with many repeated zero
    eigenvalues, on which the divide-and-conquer solver can fail to converge (seen with 8
    samples of 256-d features). Then a ridge ``eps * (trace / d)`` is added to the diagonal,
    starting at ``eps = 1e-12`` and growing 100x per retry; the ridge is subtracted from the
    eigenvalues again, so the result differs from the exact one by round-off only.
    """
    if not torch.isfinite(m).all():
        raise ValueError("the covariance holds NaN or inf: the feature network produced non-finite features")
    sym = (m + m.T) / 2
    scale = float(sym.diagonal().abs().mean().clamp_min(1e-300))
    eye = torch.eye(len(sym), dtype=sym.dtype, device=sym.device)
    ridge = 0.0
    for attempt in range(tries + 1):
        try:
            w, v = torch.linalg.eigh(sym + ridge * eye if ridge else sym)
            return w - ridge, v
        except RuntimeError:  # torch.linalg.LinAlgError
            if attempt == tries:
                raise
            ridge = scale * 1e-12 * 100**attempt
    raise AssertionError("unreachable")


def split_halves(index: Tensor, split: str = "parity", seed: int = 0) -> Tensor:
    """Boolean ``[B]``: ``True`` where instance ``index`` belongs to half B (``False``: half A).

    ``"parity"``: odd indices form half B (exactly balanced). ``"hash"``: one bit of a seeded
    integer hash of the index (deterministic, roughly balanced, different for each ``seed``).
    """
    index = index.long()
    if split == "parity":
        return index % 2 == 1
    if split == "hash":
        h = (index * 0x9E3779B1 + (seed + 1) * 0x85EBCA77) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
        h = h ^ (h >> 12)
        return ((h >> 7) & 1) == 1
    raise ValueError(f"split must be 'parity' or 'hash', got {split!r}")


_GROUPS = ("real_a", "real_b", "cf_a", "cf_b")


class SplitFID(Metric):
    """sFID (ACE) on an in-project feature network (``sfid_domain``).

    Instances (query ``x`` with its counterfactual ``x_cf``) are split into halves A and B;
    ``sFID = (FID(real A, CF of B) + FID(real B, CF of A)) / 2``, so that no counterfactual is
    compared with a set containing its own query. ACE draws random splits and averages over
    repetitions; lit-cf uses one deterministic split:

    * with ``indices`` (dataset indices of the instances) passed to ``update``, the half is a
      function of the index (``split="parity"``: even/odd; ``"hash"``: seeded hash, see
      :func:`split_halves`); results do not depend on batching or on the number of processes;
    * without ``indices``, the running position of the instance in this process's stream is
      used instead, which under DDP gives a different (still valid) split than one process.

    States are float64 sums per group (sum reduction, DDP-safe). ``compute()`` returns
    ``{"sfid_domain": Tensor}``, ``nan`` while any of the four groups has fewer than 2 images.

    Args:
        feature_extractor: Network mapping images to features (see :class:`DomainFID`).
        num_features: Feature dimension; inferred when possible (see :class:`FIDFeatures`).
        input_shape: ``(C, H, W)`` to probe the feature dimension.
        split: ``"parity"`` (default) or ``"hash"``.
        seed: Seed of the ``"hash"`` split.
        name: Output key.

    ``update(x [B, C, H, W], x_cf [B, C, H, W], indices [B] | None = None)``.
    """

    seen: Tensor  # metric state (with the per-group sums), added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        feature_extractor: nn.Module,
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        split: str = "parity",
        seed: int = 0,
        name: str = "sfid_domain",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if split not in ("parity", "hash"):
            raise ValueError(f"split must be 'parity' or 'hash', got {split!r}")
        self.features = FIDFeatures(feature_extractor, num_features, input_shape)
        self.split, self.seed, self.name = split, seed, name
        d = self.features.num_features
        for group in _GROUPS:
            self.add_state(f"{group}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{group}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{group}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("seen", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, group: str, feats: Tensor) -> None:
        setattr(self, f"{group}_sum", getattr(self, f"{group}_sum") + feats.sum(0))
        setattr(self, f"{group}_outer", getattr(self, f"{group}_outer") + feats.T @ feats)
        setattr(self, f"{group}_n", getattr(self, f"{group}_n") + len(feats))

    def update(self, x: Tensor, x_cf: Tensor, indices: Tensor | None = None) -> None:
        check_images(x, x_cf)
        n = len(x)
        if indices is None:
            indices = self.seen + torch.arange(n, device=self.seen.device)
        elif indices.shape != (n,):
            raise ValueError(f"indices must be [B] = [{n}], got shape {tuple(indices.shape)}")
        self.seen += n
        in_b = split_halves(indices.to(self.seen.device), self.split, self.seed)
        feats = self.features(torch.cat([x, x_cf], 0)).double()
        real, cf = feats[:n], feats[n:]
        in_b = in_b.to(feats.device)
        self._accumulate("real_a", real[~in_b])
        self._accumulate("real_b", real[in_b])
        self._accumulate("cf_a", cf[~in_b])
        self._accumulate("cf_b", cf[in_b])

    def _gaussian(self, group: str) -> tuple[Tensor, Tensor]:
        n = getattr(self, f"{group}_n").double()
        mean = getattr(self, f"{group}_sum") / n
        cov = (getattr(self, f"{group}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> dict[str, Tensor]:
        if any(getattr(self, f"{g}_n") < 2 for g in _GROUPS):
            return {self.name: torch.tensor(float("nan"), device=self.seen.device)}
        ra, rb, ca, cb = (self._gaussian(g) for g in _GROUPS)
        fid_ab = frechet_distance(*ra, *cb)
        fid_ba = frechet_distance(*rb, *ca)
        return {self.name: ((fid_ab + fid_ba) / 2).float()}


class DUQCertainty(Metric):
    """DUQ certainty ``max_c K_c(x)`` of counterfactuals (a density/realism score, lit-cf specific).

    High certainty means the counterfactual lies near a class centroid of the DUQ model, i.e.
    near the data it was trained on. Queries can be passed too, as a reference level.

    Args:
        duq_model: A :class:`~lit_cf.models.DUQClassifier` (anything with ``certainty(x)`` ->
            ``[B]``); kept in eval mode and called without gradients.
        name: Output prefix.
        std_correction: Degrees-of-freedom correction of the std (0: population std).

    ``update(x_cf, x=None)``; ``compute()`` -> ``duq_certainty_cf_mean/_std`` and
    ``duq_certainty_query_mean/_std`` (``nan`` when no queries were given).
    """

    cf: list[Tensor]  # metric states, added in __init__
    query: list[Tensor]

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        duq_model: nn.Module,
        name: str = "duq_certainty",
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not callable(getattr(duq_model, "certainty", None)):
            raise TypeError(f"{type(duq_model).__name__} has no certainty(x) method")
        self.model = EvalOnly(duq_model)
        self.name, self.std_correction = name, std_correction
        self.add_state("cf", [], dist_reduce_fx="cat")
        self.add_state("query", [], dist_reduce_fx="cat")

    @property
    def _certainty(self) -> Callable[[Tensor], Tensor]:
        return cast(Callable[[Tensor], Tensor], self.model.module.certainty)

    def update(self, x_cf: Tensor, x: Tensor | None = None) -> None:
        with torch.no_grad():
            self.cf.append(self._certainty(x_cf).float().reshape(-1))
            if x is not None:
                self.query.append(self._certainty(x).float().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        return {
            **mean_std_dict(f"{self.name}_cf", self.cf, self.std_correction),
            **mean_std_dict(f"{self.name}_query", self.query, self.std_correction),
        }
