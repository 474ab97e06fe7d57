"""Benchmark battery: train what is needed, explain with every method, evaluate all runs together.

``lit-cf study --config configs/study/battery.yaml`` (``--settings.data mnist
--settings.root data`` for MNIST after ``bash scripts/prepare_data.sh``). On MNIST or on the
built-in rendered digits it trains a standard CNN, a robust (L2 PGD) CNN, an oracle suite (a
CNN of another seed, a wider BatchNorm CNN, a second robust CNN), a DUQ model and an
autoencoder (LatentAttack's generator); explains test images of both explained classifiers with
pixel, DeepInversion and LatentAttack; evaluates all runs together (oracles, ``fid_domain`` on
the wide oracle's features, DUQ certainty, realism against real test images) and writes the
comparison table and the report. It has no verdict. Expected on MNIST (Vaeth et al. 2023):
counterfactuals of the robust classifier transfer to the oracles (OTA) far better than those of
the standard classifier. A run writes ``results.md`` and ``results.json`` into its output
folder; measured runs belong in ``docs/results/battery.md`` (none is recorded yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lit_cf.errors import UserError
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study, require_positive

__all__ = ["BatteryStudy"]

METHODS = ("pixel", "deepinversion", "latent_attack")
EXPLAINED = ("standard", "robust")
ORACLES = ("oracle_cnn", "oracle_wide", "oracle_robust")


@register_study
class BatteryStudy(Study):
    """Benchmark battery: a standard and a robust CNN explained with every method, evaluated together.

    Args:
        data: ``rendered`` (built in, no files) or ``mnist`` (needs ``root``).
        root: Data root of MNIST (``bash scripts/prepare_data.sh``).
        epochs: Epochs of the standard models (standard CNN, CNN and wide oracles).
        robust_epochs: Epochs of the robust (L2 PGD) models.
        duq_epochs: Epochs of the DUQ model.
        ae_epochs: Epochs of the autoencoder (LatentAttack's generator).
        queries: Test images explained per classifier and method.
        steps: Steps of every method.
        train_limit: Train every model on the first this many images only (null: all).
        accelerator: Trainer accelerator of every step.
    """

    name = "battery"

    def __init__(
        self,
        data: Literal["rendered", "mnist"] = "rendered",
        root: str = "data",
        epochs: int = 2,
        robust_epochs: int = 1,
        duq_epochs: int = 1,
        ae_epochs: int = 5,
        queries: int = 256,
        steps: int = 200,
        train_limit: int | None = None,
        accelerator: str = "auto",
    ) -> None:
        require_positive(
            epochs=epochs, robust_epochs=robust_epochs, duq_epochs=duq_epochs, ae_epochs=ae_epochs, queries=queries, steps=steps
        )
        if train_limit is not None and train_limit < 1:
            raise UserError(f"train_limit must be >= 1 (or null), got {train_limit}")
        if data == "mnist" and not Path(root).is_dir():
            raise UserError(f"data root {root} not found: run `bash scripts/prepare_data.sh SRC {root}` or pass --settings.root")
        self.data, self.root = data, root
        self.epochs, self.robust_epochs, self.duq_epochs, self.ae_epochs = epochs, robust_epochs, duq_epochs, ae_epochs
        self.queries, self.steps, self.train_limit = queries, steps, train_limit

    def data_configs(self) -> tuple[str, ...]:
        return (f"data/{self.data}.yaml",)

    def data_args(self) -> dict[str, Any]:
        return {"data.init_args.root": str(Path(self.root).resolve())} if self.data == "mnist" else {}

    def model_specs(self) -> dict[str, ModelSpec]:
        """The seven models: config, epochs and seed per name (keyed by config: reused when unchanged)."""
        models = {
            "standard": ("model/cnn.yaml", self.epochs, 0),
            "robust": ("model/robust_cnn.yaml", self.robust_epochs, 0),
            "oracle_cnn": ("model/cnn.yaml", self.epochs, 1),
            "oracle_wide": ("model/cnn_wide.yaml", self.epochs, 2),
            "oracle_robust": ("model/robust_cnn.yaml", self.robust_epochs, 3),
            "duq": ("model/duq_cnn.yaml", self.duq_epochs, 0),
            "autoencoder": ("model/autoencoder.yaml", self.ae_epochs, 0),
        }
        limit = {"data.init_args.limit": self.train_limit} if self.train_limit else {}
        return {
            name: ModelSpec(
                name,
                (*self.data_configs(), cfg),
                {**self.data_args(), **limit, "seed_everything": seed, "trainer.max_epochs": epochs},
            )
            for name, (cfg, epochs, seed) in models.items()
        }

    def run(self, ctx: StudyContext) -> StudyResult:
        ckpt = {name: ctx.fit(spec) for name, spec in self.model_specs().items()}
        runs: dict[str, Path] = {}
        for clf in EXPLAINED:
            for method in METHODS:
                # LatentAttack optimises the autoencoder's latent code (the paper's MNIST setting: lr 0.1, tau 0.75)
                generator = {"model.init_args.generator": ckpt["autoencoder"]} if method == "latent_attack" else {}
                runs[f"{clf}/{method}"] = ctx.explain(
                    f"{clf}-{method}",
                    (*self.data_configs(), f"explain/{method}.yaml"),
                    {
                        **self.data_args(),
                        **generator,
                        "classifier": ckpt[clf],
                        "num_queries": self.queries,
                        "model.init_args.steps": self.steps,
                        "chunk_size": 256,
                    },
                )
        metrics = ctx.evaluate(
            "all",
            runs,
            {
                **self.data_args(),
                "oracles": {k: str(ckpt[k]) for k in ORACLES},
                "feature_network": ckpt["oracle_wide"],
                "duq": ckpt["duq"],
            },
            configs=self.data_configs(),
        )
        report = ctx.out / "evaluate" / "all" / "report.html"
        return StudyResult(
            rows=list(metrics.get("table", [])),
            report=report if report.is_file() else None,
            notes=[f"explained: {', '.join(EXPLAINED)}; oracles: {', '.join(ORACLES)}; metrics: {ctx.out / 'evaluate' / 'all'}"],
        )
