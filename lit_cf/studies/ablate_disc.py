"""DISC ablation: ISO -> + feature preservation -> + DIP / + INR -> + manifold consistency -> + progressive.

``lit-cf study --config configs/study/ablate_disc.yaml``. Measured tables live in
``docs/results/ablate_disc.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.metrics.localisation import MOUTH_BOX, box_mask, localisation, stroke_mask
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study, resolve_config

__all__ = ["CHAIN", "AblateDISC", "check_data_overrides", "init_args", "matched_scores", "matched_valid", "region_mask"]

#: the chain: link -> DISC switches on top of configs/explain/disc.yaml (and the study's weights)
CHAIN: dict[str, dict[str, Any]] = {
    "iso": {"prior": "pixels", "feature_weight": 0, "mc_weight": 0, "progressive": False},
    "iso+fp": {"prior": "pixels", "mc_weight": 0, "progressive": False},
    "dip+fp": {"prior": "dip", "mc_weight": 0, "progressive": False},
    "inr+fp": {"prior": "inr", "mc_weight": 0, "progressive": False},
    "dip+fp+mc": {"prior": "dip", "progressive": False},
    "dip+fp+mc+prog": {"prior": "dip", "progressive": True},
}
#: evaluate's overall metrics shown per link, with their column names
COLUMNS = (
    ("flip_rate", "validity"),
    ("l1_mean", "L1"),
    ("l2_mean", "L2"),
    ("fid_domain", "fid_domain"),
    ("fid_real_domain", "FID real"),
    ("duq_certainty_cf_mean", "DUQ cert"),
    ("ota_oracle", "OTA"),
)
#: the columns of the matched part (scored on the queries valid for every link)
MATCHED = tuple(c for c in COLUMNS[1:] if c[0] != "fid_real_domain")
#: the small DUQ model of the MNIST ablation (the paper-size one is slow on a CPU)
SMALL_DUQ = {
    "model.init_args.backbone.init_args.channels": [32, 64, 64],
    "model.init_args.backbone.init_args.hidden": 128,
    "model.init_args.embedding_size": 128,
}


def check_data_overrides(study: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` as a dict, refused unless every key is a dotted ``data.init_args.*`` name."""
    bad = [k for k in overrides or {} if not k.startswith("data.init_args.")]
    if bad:
        raise UserError(f"{study}: data_overrides {bad} are not data.init_args.* keys")
    return dict(overrides or {})


def init_args(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments of dotted ``data.init_args.*`` overrides."""
    return {k.removeprefix("data.init_args."): v for k, v in overrides.items()}


def region_mask(data: str, query: Tensor) -> Tensor:
    """``[N, 1, H, W]`` relevant region per query: CelebA's mouth box; near the MNIST strokes
    (ink > 0.2, dilated by 2 px)."""
    return box_mask(query.shape, *MOUTH_BOX) if data == "celeba" else stroke_mask(query, threshold=0.2, radius=2)


def matched_valid(manifests: Sequence[Sequence[Mapping[str, Any]]]) -> Tensor:
    """``[N]`` true for the records every run turned into a valid counterfactual (the classifier
    predicts the target); the runs must list the same (query, target) records in order."""
    if not manifests:
        raise ValueError("matched_valid needs at least one run")
    keys = [[(r["index"], r["target"]) for r in rows] for rows in manifests]
    if any(k != keys[0] for k in keys):
        raise UserError("ablate_disc: the links explained different queries or targets; cannot match them")
    valid = torch.ones(len(keys[0]), dtype=torch.bool)
    for rows in manifests:
        valid &= torch.tensor([r["final_pred"] == r["target"] for r in rows], dtype=torch.bool)
    return valid


@torch.no_grad()
def matched_scores(
    query: Tensor, cf: Tensor, target: Tensor, oracle: nn.Module, duq: nn.Module, mask: Tensor
) -> dict[str, float]:
    """L1, L2, ``fid_domain`` (oracle features, the queries as the real set, as ``lit-cf
    evaluate`` does), DUQ certainty, OTA (the oracle predicts the target) and localisation of
    one run's counterfactuals on the matched queries, with evaluate's metric classes."""
    from lit_cf.metrics.features import ClassifierFeatures
    from lit_cf.metrics.realism import DomainFID, DUQCertainty

    if not len(query):
        return {}
    delta = (cf - query).flatten(1)
    fid, cert = DomainFID(ClassifierFeatures(oracle), input_shape=tuple(query.shape[1:])), DUQCertainty(duq)
    fid.update(query, real=True)
    fid.update(cf, real=False)
    cert.update(cf, query)
    return {
        "l1_mean": float(delta.abs().sum(1).mean()),
        "l2_mean": float(delta.norm(dim=1).mean()),
        "fid_domain": float(fid.compute()["fid_domain"]),
        "duq_certainty_cf_mean": float(cert.compute()["duq_certainty_cf_mean"]),
        "ota_oracle": float((oracle(cf).argmax(-1) == target).float().mean()),
        "loc": float(localisation(query, cf, mask).mean()),
    }


@register_study
class AblateDISC(Study):
    """The DISC chain ISO -> + feature preservation -> + DIP / + INR -> + manifold consistency ->
    + progressive, on the same queries and targets, scored together.

    Trains the explained classifier, an auxiliary DUQ model (manifold consistency) and an oracle
    (a wider CNN on MNIST, the CelebA CNN with another seed); explains the same test queries
    towards the same targets (``most_likely_other``) with every link (configs/explain/disc.yaml
    with switches); scores all runs with ``lit-cf evaluate`` (oracle agreement, ``fid_domain``
    on the oracle's features, DUQ certainty) and adds:

    * ``loc``: the localisation score, the share of the difference-map mass ``|x' - x|`` inside
      the relevant region (:func:`region_mask`: CelebA's mouth box, MNIST's strokes);
    * ``PSNR``: the prior's fit to the query; ``s/cf``: seconds per counterfactual (prior fit
      included), from the run manifests;
    * a matched part (``matched ...`` columns): L1, L2, ``fid_domain``, DUQ certainty, OTA and
      ``loc`` on the queries that *every* link turned into a valid counterfactual, because
      links that preserve features can leave some queries short of the target and their
      realism scores would otherwise average over another set of images than ISO's.

    The defaults are the shipped ``configs/explain/disc.yaml`` (feature weight 1.0, DIP with 32
    channels, DUQ weight 0.1, four stages of 50 steps, no per-image early stop). The feature
    weight's scale follows the classifier's activations (``feature_distance: mse``);
    ``relative_mse`` makes the term scale-free (measured choices: docs/results/ablate_disc.md).

    Args:
        data: ``mnist``, ``celeba`` or ``rendered`` (lit-cf's rendered digits, generated: no files).
        root: Data root (``MNIST/`` or ``celeba/`` inside; unused for ``rendered``).
        attribute: CelebA target attribute (e.g. ``Smiling``, ``Young``).
        epochs: Epochs of the classifier and the oracle.
        duq_epochs: Epochs of the DUQ model.
        train_limit: Train the models on the first this many images only (``null``: all).
        queries: Test queries explained by every link.
        steps: DISC steps per stage.
        fit_steps: Steps of the prior's fit to the query.
        chunk_size: Records optimised together.
        feature_weight: Weight of the feature-preservation term (links ``+fp``).
        feature_distance: ``mse``, ``relative_mse`` or ``cosine``.
        dip_channels: Channels of the deep image prior.
        fit_psnr: PSNR (dB) at which the prior's fit stops.
        mc_weight: Weight of the DUQ manifold-consistency term (links ``+mc``).
        oracle: The oracle's model config (``null``: ``model/cnn_wide.yaml`` on digits,
            ``model/cnn_celeba.yaml`` with another seed on CelebA; an oracle of another
            architecture, e.g. ``model/resnet18_celeba.yaml``, shares fewer of the classifier's
            adversarial directions).
        links: The links to run, a subset of the chain, in order.
        data_overrides: Dotted ``data.init_args.*`` overrides of every fit, explain and
            evaluation (e.g. ``{data.init_args.batch_size: 256}``).
        accelerator: Lightning accelerator.
        seed: Seed of the explain runs.
    """

    name: ClassVar[str] = "ablate_disc"

    def __init__(
        self,
        data: Literal["mnist", "celeba", "rendered"] = "mnist",
        root: str = "data",
        attribute: str = "Smiling",
        epochs: int = 2,
        duq_epochs: int = 1,
        train_limit: int | None = None,
        queries: int = 64,
        steps: int = 50,
        fit_steps: int = 300,
        chunk_size: int = 64,
        feature_weight: float = 1.0,
        feature_distance: Literal["mse", "relative_mse", "cosine"] = "mse",
        dip_channels: int = 32,
        fit_psnr: float = 30.0,
        mc_weight: float = 0.1,
        oracle: str | None = None,
        links: list[str] | None = None,
        data_overrides: dict[str, Any] | None = None,
        accelerator: str = "auto",
        seed: int = 0,
    ) -> None:
        self.links = list(CHAIN) if links is None else list(links)
        unknown = [x for x in self.links if x not in CHAIN]
        if unknown or not self.links or len(set(self.links)) != len(self.links):
            raise UserError(f"ablate_disc: links {self.links} must be distinct names from {list(CHAIN)}")
        small = {"epochs": epochs, "duq_epochs": duq_epochs, "queries": queries, "steps": steps, "chunk_size": chunk_size}
        bad = [k for k, v in small.items() if v < 1] + (["train_limit"] if train_limit is not None and train_limit < 1 else [])
        if fit_steps < 0:
            bad.append("fit_steps")
        if bad:
            raise UserError(f"ablate_disc: {', '.join(bad)} must be >= 1 (fit_steps >= 0)")
        self.data_overrides = check_data_overrides("ablate_disc", data_overrides)
        folder = Path(root) / ("MNIST" if data == "mnist" else "celeba")
        if data != "rendered" and not folder.is_dir():
            raise UserError(
                f"ablate_disc: no {folder}; copy the data first: "
                "bash scripts/prepare_data.sh ../shared/data data (then root: data)"
            )
        self.data, self.root, self.attribute = data, root, attribute
        self.epochs, self.duq_epochs, self.train_limit = epochs, duq_epochs, train_limit
        self.queries, self.steps, self.fit_steps, self.chunk_size = queries, steps, fit_steps, chunk_size
        self.feature_weight, self.feature_distance, self.mc_weight = feature_weight, feature_distance, mc_weight
        self.dip_channels, self.fit_psnr, self.seed = dip_channels, fit_psnr, seed
        if oracle is None:
            oracle = "model/cnn_celeba.yaml" if data == "celeba" else "model/cnn_wide.yaml"
        try:
            resolve_config(oracle)
        except UserError as err:
            raise UserError(f"ablate_disc: oracle: {err}") from None
        self.oracle = oracle

    # ------------------------------------------------------------------ specs
    def data_configs(self) -> tuple[str, ...]:
        return (f"data/{self.data}.yaml",)

    def data_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {} if self.data == "rendered" else {"data.init_args.root": self.root}
        if self.data == "celeba":
            args["data.init_args.target_attribute"] = self.attribute
        return {**args, **self.data_overrides}

    def model_specs(self) -> dict[str, ModelSpec]:
        """The classifier, the DUQ model and the oracle (configs, epochs, seeds)."""
        limit = {"data.init_args.limit": self.train_limit} if self.train_limit else {}

        def spec(name: str, model: str, epochs: int, seed: int, extra: Mapping[str, Any] | None = None) -> ModelSpec:
            args = {**self.data_args(), **limit, **(extra or {}), "trainer.max_epochs": epochs, "seed_everything": seed}
            return ModelSpec(name, (*self.data_configs(), model), args)

        if self.data in ("mnist", "rendered"):
            return {
                "classifier": spec("classifier", "model/cnn.yaml", self.epochs, 0),
                "duq": spec("duq", "model/duq_cnn.yaml", self.duq_epochs, 0, SMALL_DUQ),
                "oracle": spec("oracle", self.oracle, self.epochs, 2),
            }
        return {
            "classifier": spec("classifier", "model/cnn_celeba.yaml", self.epochs, 0),
            "duq": spec("duq", "model/duq_cnn_celeba.yaml", self.duq_epochs, 0),
            "oracle": spec("oracle", self.oracle, self.epochs, 1),
        }

    def explain_args(self, link: str, ckpt: Mapping[str, Path]) -> dict[str, Any]:
        switches = {
            "feature_weight": self.feature_weight,
            "feature_distance": self.feature_distance,
            "mc_weight": self.mc_weight,
            **CHAIN[link],
        }
        return {
            **self.data_args(),
            "classifier": ckpt["classifier"],
            "num_queries": self.queries,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "model.init_args.duq": ckpt["duq"],
            "model.init_args.steps": self.steps,
            "model.init_args.fit_steps": self.fit_steps,
            "model.init_args.dip_channels": self.dip_channels,
            "model.init_args.fit_psnr": self.fit_psnr,
            **{f"model.init_args.{k}": v for k, v in switches.items()},
        }

    # ------------------------------------------------------------------ run
    def matched(self, ckpt: Mapping[str, Path], runs: Mapping[str, Path]) -> dict[str, Any]:
        """The matched part: per link the scores on the queries every link made valid."""
        from lit_cf.models.base import ImageClassifier, freeze
        from lit_cf.models.duq import DUQClassifier
        from lit_cf.runs import ExplainRun
        from lit_cf.utils.checkpoint import load_module

        loaded = {name: ExplainRun(path) for name, path in runs.items()}
        valid = matched_valid([run.manifest for run in loaded.values()])
        first = next(iter(loaded.values()))
        target = torch.tensor([r["target"] for r in first.manifest])[valid]
        oracle = freeze(load_module(ckpt["oracle"], ImageClassifier))
        duq = freeze(load_module(ckpt["duq"], DUQClassifier))
        per_link = {}
        for name, run in loaded.items():
            q, cf = run.tensor("query").float()[valid], run.tensor("counterfactual").float()[valid]
            per_link[name] = matched_scores(q, cf, target, oracle, duq, region_mask(self.data, q))
        return {"n": int(valid.sum()), "links": per_link}

    def run(self, ctx: StudyContext) -> StudyResult:
        from lit_cf.runs import ExplainRun

        ckpt = {name: ctx.fit(spec) for name, spec in self.model_specs().items()}
        runs = {
            link: ctx.explain(link.replace("+", "_"), (*self.data_configs(), "explain/disc.yaml"), self.explain_args(link, ckpt))
            for link in self.links
        }
        metrics = ctx.evaluate(
            "ablation",
            runs,
            {
                **self.data_args(),
                "oracles": {"oracle": str(ckpt["oracle"])},
                "feature_network": ckpt["oracle"],
                "duq": ckpt["duq"],
            },
            configs=self.data_configs(),
        )
        matched = ctx.cached(
            "matched",
            {
                "checkpoints": {k: str(v) for k, v in ckpt.items()},
                "runs": {k: str(v) for k, v in runs.items()},
                "data": self.data,
            },
            lambda: self.matched(ckpt, runs),
        )
        rows = []
        for link, path in runs.items():
            run = ExplainRun(path)
            query, cf = run.tensor("query").float(), run.tensor("counterfactual").float()
            overall = metrics["runs"][link]["overall"]
            manifest = cast(list[dict[str, Any]], run.manifest)  # DISC adds prior_psnr to the rows
            m = matched["links"][link]
            rows.append(
                {
                    "link": link,
                    **{col: overall.get(key, float("nan")) for key, col in COLUMNS},
                    "loc": float(localisation(query, cf, region_mask(self.data, query)).mean()),
                    "PSNR": sum(float(r.get("prior_psnr", float("nan"))) for r in manifest) / len(manifest),
                    "s/cf": sum(r["seconds"] for r in manifest) / len(manifest),
                    "matched n": matched["n"],
                    **{f"matched {col}": m.get(key, float("nan")) for key, col in (*MATCHED, ("loc", "loc"))},
                }
            )
        first = next(iter(metrics["runs"].values()))["overall"]
        for label, key in (("no edit (queries)", "fid_real_domain_no_edit"), ("real floor", "fid_real_domain_floor")):
            if key in first:  # realism against real images of the target classes: the two reference rows
                blank = {k: float("nan") for k in rows[0] if k != "link"} if rows else {}
                rows.append({"link": label, **blank, "FID real": first[key]})
        what = f"{self.data}{', ' + self.attribute if self.data == 'celeba' else ''}"
        notes = [
            f"DISC ablation ({what}; {self.queries} queries, target most_likely_other)",
            f"matched columns: the {matched['n']} queries valid for every link",
        ]
        return StudyResult(rows=rows, notes=notes, report=ctx.out / "evaluate" / "ablation" / "report.html")
