"""Descriptor predictors for counterfactual attributions (Goldwasser & Hooker, 2025).

An attribution needs, for every *descriptor* of an image (an attribute label, a generative
factor, a shape measurement), a predictor ``P_j`` that can be applied to queries and to their
counterfactuals. For latent methods the predictors read latent codes, so no counterfactual is
ever re-encoded; this module fits them:

* :func:`fit_linear_predictors`: one linear predictor per descriptor, all fitted at once
  (one weight matrix ``[d, A]``) on standardised features: logistic regression (batched
  Newton / IRLS, or L-BFGS for wide features) for binary descriptors, closed-form ridge
  regression for continuous ones;
* :class:`LinearPredictors`: the fitted predictors, with ``predict``, held-out ``quality``,
  the latent ``direction`` of one descriptor (for :class:`lit_cf.explainers.LatentLinearEdit`)
  and ``save``/``load`` as safetensors with JSON metadata (no pickle);
* :func:`encode_dataset` and :func:`descriptor_targets` build the training data: latent codes
  of a dataset and its descriptor values (rendered digits: the known factors; CelebA: the 40
  attributes; MNIST-like data without labels: :func:`mnist_descriptors` image moments).
"""

from __future__ import annotations

import json
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_cf.errors import UserError

__all__ = [
    "KINDS",
    "MNIST_DESCRIPTOR_NAMES",
    "DescriptorTargets",
    "LinearPredictors",
    "descriptor_targets",
    "encode_dataset",
    "fit_linear_predictors",
    "mnist_descriptors",
]

KINDS = ("binary", "continuous")
FORMAT = "lit-cf-linear-predictors"
FORMAT_VERSION = 1
#: columns of :func:`mnist_descriptors`
MNIST_DESCRIPTOR_NAMES = ("thickness", "slant", "width", "height", "area")
# feature columns with a std below this are constant: they are left unscaled (std := 1)
_MIN_STD = 1e-8


@dataclass
class LinearPredictors:
    """One linear predictor per descriptor on standardised features.

    For features ``z`` (flattened to ``[N, d]``) the linear score is
    ``s = ((z - mean) / std) @ weight + bias`` (``[N, A]``); binary descriptors predict
    ``sigmoid(s)`` (a probability), continuous ones predict ``s`` itself.

    Attributes:
        weight: ``[d, A]`` weights in the standardised feature space.
        bias: ``[A]`` intercepts.
        mean: ``[d]`` feature means of the training data.
        std: ``[d]`` feature standard deviations (1 for constant features).
        names: Descriptor names, in column order.
        kinds: ``"binary"`` or ``"continuous"`` per descriptor.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    names: list[str]
    kinds: list[str]

    def __post_init__(self) -> None:
        self.names, self.kinds = list(self.names), list(self.kinds)
        d, a = self.weight.shape
        if self.bias.shape != (a,) or self.mean.shape != (d,) or self.std.shape != (d,):
            raise ValueError(
                f"inconsistent shapes: weight {tuple(self.weight.shape)}, bias {tuple(self.bias.shape)}, "
                f"mean {tuple(self.mean.shape)}, std {tuple(self.std.shape)}"
            )
        if len(self.names) != a or len(self.kinds) != a:
            raise ValueError(f"{a} predictors but {len(self.names)} names and {len(self.kinds)} kinds")
        _check_kinds(self.kinds)

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def binary(self) -> Tensor:
        """``[A]`` bool: which descriptors are binary."""
        return torch.tensor([k == "binary" for k in self.kinds], dtype=torch.bool)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise UserError(f"no descriptor {name!r} among the predictors; choose one of {self.names}")
        return self.names.index(name)

    def _features(self, features: Tensor) -> Tensor:
        x = features.detach().flatten(1).to(self.weight.device, torch.float32)
        if x.shape[1] != self.feature_dim:
            raise UserError(
                f"the predictors were fitted on {self.feature_dim}-d features but got {x.shape[1]}-d ones: "
                "use the generator (or feature extractor) they were fitted with"
            )
        return x

    def scores(self, features: Tensor) -> Tensor:
        """Linear scores ``[N, A]`` (logits for binary descriptors, values for continuous ones)."""
        x = self._features(features)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """Predictions ``[N, A]``: probabilities for binary descriptors, values for continuous ones."""
        s = self.scores(features)
        return torch.where(self.binary.to(s.device), s.sigmoid(), s)

    __call__ = predict

    def quality(self, features: Tensor, targets: Tensor) -> dict[str, float]:
        """Held-out quality per descriptor: accuracy (binary, at 0.5) or R^2 (continuous)."""
        pred = self.predict(features)
        y = targets.to(pred.device, torch.float32)
        if y.shape != pred.shape:
            raise ValueError(f"targets must be [N, {len(self.names)}], got {tuple(targets.shape)}")
        out = {}
        for j, (name, kind) in enumerate(zip(self.names, self.kinds)):
            if kind == "binary":
                out[name] = float(((pred[:, j] > 0.5) == (y[:, j] > 0.5)).float().mean())
            else:
                sst = (y[:, j] - y[:, j].mean()).square().sum()
                sse = (y[:, j] - pred[:, j]).square().sum()
                out[name] = float(1 - sse / sst) if sst > 0 else float("nan")
        return out

    def direction(self, name: str) -> Tensor:
        """Direction ``[d]`` in the original feature space along which descriptor ``name`` rises.

        The gradient of its linear score with respect to the (unstandardised) features:
        ``weight[:, j] / std``. Not normalised.
        """
        j = self.index(name)
        return self.weight[:, j] / self.std

    def to(self, device: torch.device | str) -> LinearPredictors:
        return LinearPredictors(
            self.weight.to(device),
            self.bias.to(device),
            self.mean.to(device),
            self.std.to(device),
            self.names,
            self.kinds,
        )

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: four tensors, names and kinds as JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        meta = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "names": json.dumps(self.names),
            "kinds": json.dumps(self.kinds),
        }
        save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearPredictors:
        """Read predictors written by :meth:`save` (safetensors: no code is executed)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"linear predictors not found: {path} (write them with LinearPredictors.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # not a safetensors file, or a truncated one
            raise UserError(f"cannot read linear predictors from {path}: {type(err).__name__}: {err}") from err
        if meta.get("format") != FORMAT or not {"weight", "bias", "mean", "std"} <= set(tensors):
            raise UserError(f"{path} is not a lit-cf linear predictor file (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise UserError(f"{path} was written by a newer lit-cf (format version {meta['version']})")
        return cls(
            tensors["weight"],
            tensors["bias"],
            tensors["mean"],
            tensors["std"],
            json.loads(meta["names"]),
            json.loads(meta["kinds"]),
        )


def _check_kinds(kinds: Sequence[str]) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"descriptor kinds must be 'binary' or 'continuous', got {bad}")


def _ridge(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Closed-form ridge on centred features ``x``: ``min mean (y - xw - b)^2 + l2 |w|^2``."""
    n, d = x.shape
    y_mean = y.mean(0)
    gram = x.T @ x / n + l2 * torch.eye(d, dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, x.T @ (y - y_mean) / n)
    return w, y_mean


def _logistic_newton(x: Tensor, y: Tensor, l2: float, steps: int, tol: float) -> tuple[Tensor, Tensor]:
    """Batched Newton (IRLS) for ``A`` independent L2-regularised logistic regressions.

    Minimises ``mean BCE(x w_a + b_a, y_a) + l2 |w_a|^2`` per column; the bias is not
    regularised. Each column gets its own ``[d+1, d+1]`` Hessian and its own step length
    (halved until its objective does not increase), so the fits do not interact.
    """
    n, d = x.shape
    a = y.shape[1]
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1)  # [n, d+1]
    theta = torch.zeros(d + 1, a, dtype=x.dtype, device=x.device)
    reg = torch.full((d + 1,), 2 * l2, dtype=x.dtype, device=x.device)
    reg[-1] = 1e-10  # bias: unregularised (a tiny ridge keeps an all-0/all-1 column solvable)

    def objective(th: Tensor) -> Tensor:  # [a]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(xb @ th, y, reduction="none").mean(0)
        return bce + 0.5 * (reg[:, None] * th * th).sum(0)

    loss = objective(theta)
    for _ in range(steps):
        p = (xb @ theta).sigmoid()  # [n, a]
        grad = xb.T @ (p - y) / n + reg[:, None] * theta  # [d+1, a]
        wts = (p * (1 - p)).T  # [a, n]
        hess = torch.einsum("an,ni,nj->aij", wts, xb, xb) / n + torch.diag(reg)  # [a, d+1, d+1]
        delta = torch.linalg.solve(hess, grad.T.unsqueeze(-1)).squeeze(-1).T  # [d+1, a]
        # damped: halve a column's step until its objective does not increase (separable data)
        t = torch.ones(a, dtype=x.dtype, device=x.device)
        for _ in range(30):
            new_loss = objective(theta - t * delta)
            worse = new_loss > loss + 1e-12
            if not worse.any():
                break
            t = torch.where(worse, t / 2, t)
        theta, loss = theta - t * delta, objective(theta - t * delta)
        if float((t * delta).abs().max()) < tol:
            break
    return theta[:-1], theta[-1]


def _logistic_lbfgs(x: Tensor, y: Tensor, l2: float, steps: int, tol: float) -> tuple[Tensor, Tensor]:
    """L-BFGS on the sum of the ``A`` logistic objectives (separable: same optimum per column)."""
    n, d = x.shape
    w = torch.zeros(d, y.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=tol, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_linear_predictors(
    features: Tensor,
    targets: Tensor,
    kinds: Sequence[str],
    names: Sequence[str] | None = None,
    l2: float = 1e-3,
    steps: int = 50,
    solver: str = "auto",
    tol: float = 1e-6,
) -> LinearPredictors:
    """Fit one linear predictor per descriptor, all at once.

    Features are standardised (per-column mean and std of the training data). Continuous
    descriptors: ridge regression in closed form, ``min mean (y - s)^2 + l2 |w|^2``. Binary
    descriptors (targets in ``[0, 1]``, e.g. labels): logistic regression,
    ``min mean BCE(s, y) + l2 |w|^2`` (bias unregularised), by batched Newton steps
    (``solver="newton"``, exact) or L-BFGS (``"lbfgs"``, for wide features where ``A`` Hessians
    of ``d x d`` would not fit); ``"auto"`` picks Newton up to ``d = 1024``.

    Args:
        features: ``[N, ...]`` features (flattened to ``[N, d]``), e.g. latent codes.
        targets: ``[N, A]`` descriptor values.
        kinds: ``"binary"`` or ``"continuous"`` per descriptor.
        names: Descriptor names (default ``d0, d1, ...``).
        l2: Ridge / L2 penalty strength on the standardised weights.
        steps: Maximum Newton iterations (or L-BFGS iterations).
        solver: ``"auto"``, ``"newton"`` or ``"lbfgs"`` for the binary descriptors.
        tol: Convergence tolerance (largest Newton update, or L-BFGS gradient).
    """
    x = features.detach().flatten(1).double()
    y = targets.detach().double()
    kinds = list(kinds)
    _check_kinds(kinds)
    if y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] != len(kinds):
        raise ValueError(
            f"expected targets [N={x.shape[0]}, A={len(kinds)}], got {tuple(targets.shape)} for features {tuple(features.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples to fit predictors")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("features and targets must be finite")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver must be 'auto', 'newton' or 'lbfgs', got {solver!r}")
    names = list(names) if names is not None else [f"d{j}" for j in range(len(kinds))]
    if len(names) != len(kinds):
        raise ValueError(f"{len(names)} names for {len(kinds)} descriptors")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
    xs = (x - mean) / std
    d, a = xs.shape[1], y.shape[1]
    weight = torch.zeros(d, a, dtype=torch.float64, device=x.device)
    bias = torch.zeros(a, dtype=torch.float64, device=x.device)
    is_bin = torch.tensor([k == "binary" for k in kinds], device=x.device)
    cont = (~is_bin).nonzero().flatten()
    if len(cont):
        weight[:, cont], bias[cont] = _ridge(xs, y[:, cont], l2)
    binc = is_bin.nonzero().flatten()
    if len(binc):
        yb = y[:, binc]
        if ((yb < 0) | (yb > 1)).any():
            raise ValueError("binary descriptor targets must be in [0, 1] (e.g. labels 0/1)")
        use_newton = solver == "newton" or (solver == "auto" and d <= 1024)
        fit = _logistic_newton if use_newton else _logistic_lbfgs
        weight[:, binc], bias[binc] = fit(xs, yb, l2, steps, tol)
    return LinearPredictors(weight.float(), bias.float(), mean.float(), std.float(), names, kinds)


# ----------------------------------------------------------------------------- training data
def _image_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def encode_dataset(
    generator: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str | None = None
) -> Tensor:
    """Latent codes ``generator.encode(image)`` of every sample, in dataset order, on the CPU.

    ``generator`` is anything with ``encode(x) -> z`` (an autoencoder, or a GAN-inversion
    wrapper); it is put in eval mode. Returns ``[N, *latent_shape]``.
    """
    encode = getattr(generator, "encode", None)
    if not callable(encode):
        raise UserError(f"{type(generator).__name__} has no encode(x) method: pass an autoencoder or an inversion wrapper")
    device = torch.device(device) if device is not None else next(generator.parameters(), torch.empty(0)).device
    generator.eval()
    out = [encode(batch["image"].to(device)).float().cpu() for batch in _image_loader(dataset, batch_size)]
    if not out:
        raise UserError("the dataset is empty: nothing to encode")
    return torch.cat(out)


@dataclass
class DescriptorTargets:
    """Descriptor values of a dataset: ``values [N, A]``, names and kinds per column."""

    values: Tensor
    names: list[str]
    kinds: list[str]


def _find_attr(dataset: object, attr: str) -> Any:
    """``dataset.attr``, looking through wrappers that keep the wrapped set in ``.dataset``."""
    seen = 0
    while dataset is not None and seen < 8:
        if hasattr(dataset, attr):
            return getattr(dataset, attr)
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None


@torch.no_grad()
def descriptor_targets(dataset: Dataset, batch_size: int = 512) -> DescriptorTargets:
    """Descriptor values of every sample of a lit-cf dataset, by what its samples carry.

    * ``factors`` (built-in rendered digits): the 7 known factors mapped to ``[0, 1]`` with
      :func:`lit_cf.data.rendered.normalize_factors`; ``mark`` is binary, the rest continuous.
    * ``attributes`` (CelebA): the 40 attributes in ``{0, 1}``, all binary.
    * neither, grayscale images (MNIST, Fashion-MNIST): the image moments of
      :func:`mnist_descriptors`, all continuous.
    """
    if len(cast(Sized, dataset)) == 0:
        raise UserError("the dataset is empty: no descriptors to compute")
    first = dataset[0]
    if "factors" in first:
        from lit_cf.data.rendered import FACTOR_NAMES, normalize_factors

        values = torch.cat([normalize_factors(b["factors"].float()) for b in _image_loader(dataset, batch_size)])
        names = list(_find_attr(dataset, "factor_names") or FACTOR_NAMES)
        return DescriptorTargets(values, names, ["binary" if n == "mark" else "continuous" for n in names])
    if "attributes" in first:
        values = torch.cat([b["attributes"].float() for b in _image_loader(dataset, batch_size)])
        names = _find_attr(dataset, "attribute_names")
        names = list(names) if names is not None else [f"attribute_{j}" for j in range(values.shape[1])]
        return DescriptorTargets(values, names, ["binary"] * len(names))
    if first["image"].shape[0] != 1:
        raise UserError("the samples carry no factors or attributes and are not grayscale: no built-in descriptors for them")
    values = torch.cat([mnist_descriptors(b["image"]) for b in _image_loader(dataset, batch_size)])
    return DescriptorTargets(values, list(MNIST_DESCRIPTOR_NAMES), ["continuous"] * len(MNIST_DESCRIPTOR_NAMES))


def mnist_descriptors(images: Tensor, ink_threshold: float = 0.5) -> Tensor:
    """Shape descriptors of grayscale digit images ``[N, 1, H, W]`` in ``[0, 1]``: ``[N, 5]``.

    Columns (:data:`MNIST_DESCRIPTOR_NAMES`), in pixels, with ``x`` = column (right) and
    ``y`` = row (down), and ``m = sum of pixel values`` the ink mass:

    * ``thickness``: ``2 m / TV`` with ``TV`` the anisotropic total variation of the image
      (sum of absolute differences between horizontal and vertical neighbours, zero padded).
      For a stroke of width ``t`` and length ``L >> t`` the mass is ``~ t L`` and the TV
      ``~ 2 L`` (both edges), so the ratio is the stroke width whatever the stroke's shape,
      orientation or intensity (a "mass over skeleton length" proxy without skeletonising).
    * ``slant``: ``-mu11 / mu02`` from the ink-weighted central moments; the horizontal shift
      per row, positive when the top of the digit leans to the right (the convention of the
      rendered digits), i.e. ``tan`` of the shear angle for a sheared upright stroke.
    * ``width`` / ``height``: bounding box (``max - min + 1``) of the pixels ``> ink_threshold``
      (0 for an image with no such pixel).
    * ``area``: the ink mass ``m``.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grayscale images [N, 1, H, W], got {tuple(images.shape)}")
    x = images[:, 0].float()
    n, h, w = x.shape
    mass = x.sum((1, 2))
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    tv = (pad[:, :, 1:] - pad[:, :, :-1]).abs().sum((1, 2)) + (pad[:, 1:, :] - pad[:, :-1, :]).abs().sum((1, 2))
    thickness = torch.where(tv > 0, 2 * mass / tv.clamp_min(1e-12), torch.zeros_like(mass))
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
    m = mass.clamp_min(1e-12).view(n, 1, 1)
    cy = (x * ys).sum((1, 2), keepdim=True) / m
    cx = (x * xs).sum((1, 2), keepdim=True) / m
    mu11 = (x * (xs - cx) * (ys - cy)).sum((1, 2))
    mu02 = (x * (ys - cy).square()).sum((1, 2))
    slant = torch.where(mu02 > 1e-12, -mu11 / mu02.clamp_min(1e-12), torch.zeros_like(mu11))
    ink = x > ink_threshold
    cols, rows = ink.any(1), ink.any(2)  # [n, w], [n, h]

    def extent(mask: Tensor) -> Tensor:
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        hi = torch.where(mask, idx, torch.full_like(idx, -1)).max(1).values
        lo = torch.where(mask, idx, torch.full_like(idx, mask.shape[1])).min(1).values
        return torch.where(mask.any(1), hi - lo + 1, torch.zeros_like(hi)).to(x.dtype)

    return torch.stack([thickness, slant, extent(cols), extent(rows), mass], 1)
