"""Decision-boundary learning (DISC's second claim): students trained on counterfactuals only.

``lit-cf study --config configs/study/student_disc.yaml``. Measured tables live in
``docs/results/student_disc.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from lit_cf.errors import UserError
from lit_cf.metrics.model_scores import corruption_accuracy, predict
from lit_cf.studies.ablate_disc import SMALL_DUQ, check_data_overrides, init_args
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study

__all__ = ["METHODS", "StudentDISC", "student_scores"]

Method = Literal["disc", "iso", "deepinversion"]

#: method -> (explain config, its switches); one-stage methods get 4x the steps of a DISC stage
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "disc": ("explain/disc.yaml", {"model.init_args.prior": "dip", "model.init_args.progressive": True}),
    "iso": (
        "explain/disc.yaml",
        {
            "model.init_args.prior": "pixels",
            "model.init_args.feature_weight": 0,
            "model.init_args.mc_weight": 0,
            "model.init_args.progressive": False,
        },
    ),
    "deepinversion": ("explain/deepinversion.yaml", {"model.init_args.stop_probability": 0.8}),
}


def student_scores(
    student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, severities: list[int]
) -> dict[str, Any]:
    """Clean accuracy, agreement with the teacher (clean), and accuracy under every corruption of
    :mod:`lit_cf.data.corruptions` at ``severities`` (the same corrupted images for every student)."""
    with torch.no_grad():
        s_clean, t_clean = predict(student, images), predict(teacher, images)
    return {
        "clean_acc": float((s_clean == labels).float().mean()),
        "agreement": float((s_clean == t_clean).float().mean()),
        **corruption_accuracy(student, images, labels, severities=severities, seed=0),
    }


@register_study
class StudentDISC(Study):
    """Students trained with ``lit-cf fit`` only on queries + counterfactuals labelled by the teacher.

    The teacher is a CNN trained on MNIST. Queries come from the *validation* split (never seen
    in the teacher's training, disjoint from the test set the students are scored on). For each
    method (DISC, ISO, DeepInversion by default) the same queries are explained towards the same
    targets (``most_likely_other`` or ``all`` other classes); a student with the teacher's
    architecture is then trained on :class:`~lit_cf.data.CounterfactualDataModule`: the queries
    plus their counterfactuals, labelled by the teacher. One row per method: the student's
    accuracy on the clean test set, its agreement with the teacher (clean), and its accuracy
    under every corruption at the given severities (mean over all, and per corruption averaged
    over severities), on the first ``test_size`` test images.

    Args:
        root: Data root holding ``MNIST/``.
        methods: Methods whose counterfactuals train a student, in order.
        queries: Validation images used as queries.
        targets: Targets per query: ``most_likely_other``, ``most_likely_others:K`` (the teacher's
            K most probable other classes) or ``all`` other classes.
        steps: Steps per DISC stage (x4 for the one-stage methods).
        fit_steps: Steps of DISC's prior fit.
        dip_channels: Channels of DISC's deep image prior.
        student_epochs: Epochs of each student.
        teacher_epochs: Epochs of the teacher.
        train_limit: Train the teacher and the DUQ model on the first this many images only
            (``null``: all; a setting for quick checks).
        test_size: Test images the students are scored on.
        severities: Corruption severities (1-5) averaged over.
        chunk_size: Records optimised together.
        data_overrides: Dotted ``data.init_args.*`` overrides of MNIST for the teacher, the DUQ
            model and the explain runs (not the students' counterfactual data).
        accelerator: Lightning accelerator.
    """

    name: ClassVar[str] = "student_disc"

    def __init__(
        self,
        root: str = "data",
        methods: list[Method] | None = None,
        queries: int = 256,
        targets: str = "most_likely_others:3",
        steps: int = 50,
        fit_steps: int = 200,
        dip_channels: int = 16,
        student_epochs: int = 30,
        teacher_epochs: int = 2,
        train_limit: int | None = None,
        test_size: int = 2000,
        severities: list[int] | None = None,
        chunk_size: int = 64,
        data_overrides: dict[str, Any] | None = None,
        accelerator: str = "auto",
    ) -> None:
        self.methods: list[str] = list(METHODS) if methods is None else list(methods)
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise UserError(f"student_disc: methods must be distinct names from {list(METHODS)}, at least one")
        if targets not in ("most_likely_other", "all", *(f"most_likely_others:{k}" for k in range(1, 10))):
            raise UserError(
                f"student_disc: targets must be most_likely_other, most_likely_others:K (K in 1..9) or all, got {targets!r}"
            )
        self.severities = [1, 2, 3, 4, 5] if severities is None else list(severities)
        if not self.severities or any(s not in range(1, 6) for s in self.severities):
            raise UserError(f"student_disc: severities must be integers in 1..5, got {self.severities}")
        counts = {
            "queries": queries,
            "steps": steps,
            "student_epochs": student_epochs,
            "teacher_epochs": teacher_epochs,
            "test_size": test_size,
            "chunk_size": chunk_size,
        }
        bad = [k for k, v in counts.items() if v < 1] + (["train_limit"] if train_limit is not None and train_limit < 1 else [])
        if bad:
            raise UserError(f"student_disc: {', '.join(bad)} must be >= 1")
        self.data_overrides = check_data_overrides("student_disc", data_overrides)
        if not (Path(root) / "MNIST").is_dir():
            raise UserError(
                f"student_disc: no MNIST folder under {root}; run: bash scripts/prepare_data.sh ../shared/data {root}"
            )
        self.root, self.queries, self.targets, self.steps, self.fit_steps = root, queries, targets, steps, fit_steps
        self.dip_channels, self.student_epochs, self.teacher_epochs = dip_channels, student_epochs, teacher_epochs
        self.train_limit, self.test_size, self.chunk_size = train_limit, test_size, chunk_size

    def spec(self, name: str, model: str, epochs: int, extra: dict[str, Any] | None = None) -> ModelSpec:
        limit = {"data.init_args.limit": self.train_limit} if self.train_limit else {}
        args = {
            "data.init_args.root": self.root,
            **self.data_overrides,
            **limit,
            **(extra or {}),
            "trainer.max_epochs": epochs,
            "seed_everything": 0,
        }
        return ModelSpec(name, ("data/mnist.yaml", model), args)

    def explain_args(self, method: str, teacher: Path, duq: Path) -> dict[str, Any]:
        cfg, switches = METHODS[method]
        args: dict[str, Any] = {
            "data.init_args.root": self.root,
            **self.data_overrides,
            "classifier": teacher,
            "split": "val",
            "num_queries": self.queries,
            "target": self.targets,
            "chunk_size": self.chunk_size,
            "model.init_args.steps": self.steps * (1 if method == "disc" else 4),
        }
        if cfg.endswith("disc.yaml"):
            args.update(
                {
                    "model.init_args.duq": duq,
                    "model.init_args.fit_steps": self.fit_steps,
                    "model.init_args.dip_channels": self.dip_channels,
                }
            )
        return {**args, **switches}

    def run(self, ctx: StudyContext) -> StudyResult:
        from lit_cf.data import MNISTDataModule
        from lit_cf.models.base import ImageClassifier
        from lit_cf.runs import ExplainRun
        from lit_cf.utils.checkpoint import load_module

        teacher_ckpt = ctx.fit(self.spec("teacher", "model/cnn.yaml", self.teacher_epochs))
        duq_ckpt = ctx.fit(self.spec("duq", "model/duq_cnn.yaml", 1, SMALL_DUQ))
        test = MNISTDataModule(**{**init_args(self.data_overrides), "root": self.root, "download": False}).dataset("test")
        n = min(self.test_size, len(test))  # type: ignore[arg-type]  # a map-style dataset
        images = torch.stack([test[i]["image"] for i in range(n)])
        labels = torch.tensor([int(test[i]["label"]) for i in range(n)])
        teacher = load_module(teacher_ckpt, ImageClassifier).eval()
        rows, results = [], {}
        for method in self.methods:
            args = self.explain_args(method, teacher_ckpt, duq_ckpt)
            # the run's name carries its arguments' key: a student is keyed by the run it learns from
            key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:8]
            run = ctx.explain(f"{method}-{key}", ("data/mnist.yaml", METHODS[method][0]), args)
            student_spec = ModelSpec(
                f"student-{method}",
                ("model/cnn.yaml",),
                {
                    "data": "lit_cf.data.CounterfactualDataModule",
                    "data.init_args.runs": [str(run)],
                    "data.init_args.num_classes": 10,
                    "data.init_args.batch_size": 64,
                    "trainer.max_epochs": self.student_epochs,
                    "seed_everything": 1,
                },
            )
            student_ckpt = ctx.fit(student_spec)

            def score(ckpt: Path = student_ckpt) -> dict[str, Any]:
                student = load_module(ckpt, ImageClassifier).eval()
                return student_scores(student, teacher, images, labels, self.severities)

            res = ctx.cached(
                f"scores-{method}", {"student": str(student_ckpt), "test_size": n, "severities": self.severities}, score
            )
            manifest = ExplainRun(run).manifest
            res = {**res, "success": sum(bool(r["success"]) for r in manifest), "records": len(manifest)}
            res["explain_seconds"] = round(sum(r["chunk_seconds"] for r in {r["chunk"]: r for r in manifest}.values()), 1)
            results[method] = res
            rows.append(
                {
                    "method": method,
                    "clean acc": res["clean_acc"],
                    "agreement": res["agreement"],
                    "corrupted acc (mean)": res["corrupted_acc"],
                    **res["per_corruption"],
                    "valid cf": f"{res['success']}/{res['records']}",
                    "explain s": res["explain_seconds"],
                }
            )
        notes = [
            f"students trained on {self.queries} validation queries + their counterfactuals ({self.targets}); "
            f"scored on {n} test images, severities {self.severities}"
        ]
        return StudyResult(rows=rows, notes=notes)
