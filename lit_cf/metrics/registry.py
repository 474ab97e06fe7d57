"""The metrics ``lit-cf evaluate`` runs: name -> how to build, update and summarise each.

Each :class:`MetricSpec` says what it needs (:attr:`MetricSpec.applies`); the set a run gets
is decided by the inputs given (:func:`select_metrics`): an oracle adds OS/OTA for it, a
feature network the perceptual distance and the Fréchet distances, a DUQ model its certainty,
a descriptor predictor of binary attributes MNAC (and CD when the data's correlations are
known). Validity, closeness and oracle agreement are also computed per source -> target pair
(``per_pair``). Every update reads one :class:`Batch`, so adding a metric is one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_cf.metrics.closeness import LpDistance, PerceptualDistance
from lit_cf.metrics.cout import COUT
from lit_cf.metrics.descriptors import MNAC, CorrelationDifference
from lit_cf.metrics.factors import DescriptorSetup
from lit_cf.metrics.features import FeatureMaps
from lit_cf.metrics.oracle import OracleAgreement
from lit_cf.metrics.realism import DomainFID, DUQCertainty, SplitFID
from lit_cf.metrics.validity import Validity
from lit_cf.models.base import ImageClassifier
from lit_cf.models.descriptors import DescriptorPredictor

__all__ = [
    "LP",
    "REGISTRY",
    "Batch",
    "FeatureParts",
    "MetricContext",
    "MetricSpec",
    "Oracle",
    "Scorers",
    "build_metrics",
    "select_metrics",
    "summarise",
]

LP = (1.0, 1.5, 2.0)


@dataclass(frozen=True)
class FeatureParts:
    """The feature network's pieces: perceptual network and layers, FID features, how chosen."""

    network: nn.Module
    layers: list[str]
    extractor: nn.Module
    how: str


@dataclass(frozen=True)
class Oracle:
    """An independently trained classifier and its identity (masked when it is the explained one)."""

    model: ImageClassifier
    identity: str | None


@dataclass(frozen=True)
class Scorers:
    """The models evaluate scores every run with (loaded once), and its settings."""

    oracles: Mapping[str, Oracle] = field(default_factory=dict)
    features: FeatureParts | None = None
    duq: nn.Module | None = None
    descriptors: DescriptorPredictor | None = None
    cout_steps: int = 50
    batch_size: int = 256


@dataclass(frozen=True)
class MetricContext:
    """What decides and builds the metrics of one run."""

    scorers: Scorers
    classifier: ImageClassifier
    descriptor_setup: DescriptorSetup | None = None


@dataclass(frozen=True)
class Batch:
    """One batch of records with everything the metrics update from (all on one device).

    ``desc_query``/``desc_cf`` are the descriptor predictor's outputs (None without one);
    ``correct`` marks queries the classifier got right (COUT is defined on those).
    """

    x: Tensor
    x_cf: Tensor
    probs: Tensor
    preds: Tensor
    target: Tensor
    source: Tensor
    index: Tensor
    correct: Tensor
    oracle_preds: Mapping[str, Tensor]
    desc_query: Tensor | None = None
    desc_cf: Tensor | None = None

    def select(self, mask: Tensor) -> Batch:
        """The records of ``mask`` only."""
        return replace(
            self,
            x=self.x[mask],
            x_cf=self.x_cf[mask],
            probs=self.probs[mask],
            preds=self.preds[mask],
            target=self.target[mask],
            source=self.source[mask],
            index=self.index[mask],
            correct=self.correct[mask],
            oracle_preds={k: v[mask] for k, v in self.oracle_preds.items()},
            desc_query=None if self.desc_query is None else self.desc_query[mask],
            desc_cf=None if self.desc_cf is None else self.desc_cf[mask],
        )


@dataclass(frozen=True)
class MetricSpec:
    """One metric of evaluate.

    Attributes:
        key: Name in the metric set (its ``compute()`` keys are what the outputs show).
        build: A fresh metric for a run (or a pair).
        update: Feed it one :class:`Batch`.
        applies: Whether the inputs given allow it.
        per_pair: Also computed per source -> target pair.
        oracle: The oracle whose agreement it measures (its outputs are suffixed with the
            oracle's name and masked when the oracle is the explained classifier).
    """

    key: str
    build: Callable[[MetricContext], Metric]
    update: Callable[[Metric, Batch], None]
    applies: Callable[[MetricContext], bool] = lambda ctx: True
    per_pair: bool = False
    oracle: str | None = None


def _lp_spec(p: float) -> MetricSpec:
    return MetricSpec(f"lp{p}", lambda ctx: LpDistance(p), lambda m, b: m.update(b.x, b.x_cf), per_pair=True)


def _oracle_spec(name: str) -> MetricSpec:
    return MetricSpec(
        f"oracle:{name}",
        lambda ctx: OracleAgreement(),
        lambda m, b: m.update(b.oracle_preds[name], b.preds, b.target),
        per_pair=True,
        oracle=name,
    )


def _features(ctx: MetricContext) -> FeatureParts:
    assert ctx.scorers.features is not None  # guarded by applies
    return ctx.scorers.features


def _duq(ctx: MetricContext) -> nn.Module:
    assert ctx.scorers.duq is not None  # guarded by applies
    return ctx.scorers.duq


def _update_fid(m: Metric, b: Batch) -> None:
    m.update(b.x, real=True)
    m.update(b.x_cf, real=False)


def _desc(b: Batch) -> tuple[Tensor, Tensor]:
    assert b.desc_query is not None and b.desc_cf is not None  # guarded by applies
    return b.desc_query, b.desc_cf


def _has_features(ctx: MetricContext) -> bool:
    return ctx.scorers.features is not None


def _attributes(ctx: MetricContext) -> bool:
    # MNAC/CD count binary attribute flips; continuous factors get ground-truth scores instead
    d = ctx.scorers.descriptors
    return d is not None and ctx.descriptor_setup is not None and d.key == "attributes"


def _setup(ctx: MetricContext) -> DescriptorSetup:
    assert ctx.descriptor_setup is not None  # guarded by applies
    return ctx.descriptor_setup


def _cd(ctx: MetricContext) -> Metric:
    setup = _setup(ctx)
    assert setup.target_index is not None and setup.data_correlation is not None  # guarded by applies
    return CorrelationDifference(setup.target_index, setup.data_correlation)


#: the metrics in output order; ``"oracles"`` marks where one :func:`_oracle_spec` per oracle goes
REGISTRY: tuple[MetricSpec | str, ...] = (
    MetricSpec("validity", lambda ctx: Validity(), lambda m, b: m.update(b.probs, b.target, b.source), per_pair=True),
    *(_lp_spec(p) for p in LP),
    "oracles",
    MetricSpec(
        "perceptual",
        lambda ctx: PerceptualDistance(FeatureMaps(_features(ctx).network, _features(ctx).layers)),
        lambda m, b: m.update(b.x, b.x_cf),
        applies=_has_features,
    ),
    MetricSpec("fid", lambda ctx: DomainFID(_features(ctx).extractor), _update_fid, applies=_has_features),
    MetricSpec(
        "sfid", lambda ctx: SplitFID(_features(ctx).extractor), lambda m, b: m.update(b.x, b.x_cf, b.index), applies=_has_features
    ),
    MetricSpec(
        "duq",
        lambda ctx: DUQCertainty(_duq(ctx)),
        lambda m, b: m.update(b.x_cf, b.x),
        applies=lambda ctx: ctx.scorers.duq is not None,
    ),
    MetricSpec(
        "cout",
        lambda ctx: COUT(ctx.classifier, steps=ctx.scorers.cout_steps),
        lambda m, b: m.update(b.x, b.x_cf, b.target, b.source, mask=b.correct),
    ),
    MetricSpec(
        "mnac", lambda ctx: MNAC(target_attribute=_setup(ctx).target_index), lambda m, b: m.update(*_desc(b)), applies=_attributes
    ),
    MetricSpec(
        "cd",
        _cd,
        lambda m, b: m.update(*_desc(b)),
        applies=lambda ctx: _attributes(ctx) and _setup(ctx).data_correlation is not None,
    ),
)


def select_metrics(ctx: MetricContext, per_pair: bool = False) -> list[MetricSpec]:
    """The metrics the inputs allow, in output order (only the per-pair ones with ``per_pair``)."""
    specs: list[MetricSpec] = []
    for entry in REGISTRY:
        if isinstance(entry, str):
            specs += [_oracle_spec(name) for name in ctx.scorers.oracles]
        elif entry.applies(ctx):
            specs.append(entry)
    return [s for s in specs if s.per_pair or not per_pair]


def build_metrics(specs: list[MetricSpec], ctx: MetricContext, device: torch.device) -> dict[str, Metric]:
    """Fresh metrics of ``specs`` on ``device``, keyed by name."""
    return {s.key: s.build(ctx).to(device) for s in specs}


def summarise(
    specs: list[MetricSpec], metrics: Mapping[str, Metric], oracles: Mapping[str, Oracle], classifier_identity: str | None
) -> dict[str, float]:
    """Every metric's ``compute()`` as floats; oracle outputs suffixed, their means added.

    An oracle identical to the explained classifier gives NaN (it would agree by construction).
    """
    out: dict[str, float] = {}
    for spec in specs:
        values = {k: float(v) for k, v in metrics[spec.key].compute().items()}
        if spec.oracle is not None:
            if oracles[spec.oracle].identity == classifier_identity:  # an oracle identical to the explained model
                values = {k: float("nan") for k in values}
            out.update({f"{k}_{spec.oracle}": v for k, v in values.items()})
        else:
            out.update(values)
    oracle_ota = [v for k, v in out.items() if k.startswith("ota_") and not math.isnan(v)]
    oracle_os = [v for k, v in out.items() if k.startswith("os_") and not math.isnan(v)]
    if oracle_ota:
        out["ota_mean"] = sum(oracle_ota) / len(oracle_ota)
        out["os_mean"] = sum(oracle_os) / len(oracle_os)
    return out


def as_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """``{k: float(v)}`` of a metric's ``compute()``."""
    return {k: float(v) for k, v in values.items()}
