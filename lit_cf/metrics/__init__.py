"""Counterfactual evaluation metrics (torchmetrics ``Metric`` subclasses).

Every metric batches, runs on any device and reduces across processes (sum states for counts
and moments, ``cat`` states for per-sample values). ``compute()`` always returns a
``dict[str, Tensor]`` of scalars, with this naming rule:

* set-level shares and distances: ``flip_rate``, ``oa``, ``os``, ``ota``, ``fid_domain``,
  ``sfid_domain``, ``cd``;
* per-sample quantities: ``<name>_mean`` and ``<name>_std`` (population std unless
  ``std_correction=1``): ``tconf``, ``oconf``, ``l1``/``l1.5``/``l2``, ``perceptual_domain``,
  ``duq_certainty_cf``/``duq_certainty_query``, ``mnac``, ``cout``, ``diversity_*``;
* ``nan`` where a metric saw too few samples.

Networks that would be pretrained elsewhere (Inception, VGG, AlexNet) are in-project networks
here, and the outputs say so (``_domain``). See ``shared/specs/metrics.md`` for definitions.
"""

from lit_cf.metrics.closeness import LpDistance, PerceptualDistance, lp_distance, perceptual_distance
from lit_cf.metrics.cout import COUT, insertion_curves, trapezoid_auc
from lit_cf.metrics.descriptors import MNAC, CorrelationDifference, attribute_correlation
from lit_cf.metrics.diversity import Diversity, l1_per_pixel
from lit_cf.metrics.features import ClassifierFeatures, FeatureMaps
from lit_cf.metrics.oracle import OracleAgreement, oracle_predictions
from lit_cf.metrics.realism import DomainFID, DUQCertainty, FIDFeatures, SplitFID, frechet_distance, split_halves
from lit_cf.metrics.validity import Validity

__all__ = [
    "COUT",
    "MNAC",
    "ClassifierFeatures",
    "CorrelationDifference",
    "DUQCertainty",
    "Diversity",
    "DomainFID",
    "FIDFeatures",
    "FeatureMaps",
    "LpDistance",
    "OracleAgreement",
    "PerceptualDistance",
    "SplitFID",
    "Validity",
    "attribute_correlation",
    "frechet_distance",
    "insertion_curves",
    "l1_per_pixel",
    "lp_distance",
    "oracle_predictions",
    "perceptual_distance",
    "split_halves",
    "trapezoid_auc",
]
