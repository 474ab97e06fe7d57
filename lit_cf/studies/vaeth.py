"""Diffusion counterfactuals under different guiding classifiers (seed: Vaeth et al.), at MNIST scale.

``lit-cf study --config configs/study/vaeth.yaml``. Measured tables live in
``docs/results/vaeth.md``.

Two parts on the same test queries and targets:

* **the grid**: DVCE guided by each classifier of ``guides`` (the standard CNN, the robust (PGD)
  CNN, a randomly initialised CNN, the DUQ model) x ``cones`` (the cone projection towards the
  robust CNN's gradient on/off; the robust guide is run without it: a cone around its own
  gradient changes nothing) x ``x0_predictions`` (the classifier gradient taken through the
  denoiser, or directly at x0-hat; ``x0_off_input: x_t`` reads "off" as the classifier seeing
  the noisy sample instead, the other reading of the paper, in its own run folders ``...-nox0xt``),
  every cell with DVCE's shipped config plus ``grid_args`` (e.g. a stronger classifier weight);
* **the methods table**: every lit-cf method explaining the standard CNN (pixel, DeepInversion,
  DISC with the DUQ term, LatentAttack, DVCE with and without the cone, FastDiME, ACE), each with
  its shipped config and the DDPM of this study, scored together. The table runs first (its goal
  row is the headline); its ``dvce`` / ``dvce_cone`` runs are the grid's standard-guide cells
  with x0-prediction (the same arguments), so the grid reuses them instead of running them twice.

Queries are the first ``queries`` test images the standard CNN classifies correctly; every run
gets the same target per query, the standard CNN's most likely other class (a target file),
whatever classifier it explains (a query a guide already assigns to its target is skipped in
that run, ``on_source_equals_target: skip``). Everything is scored by ``lit-cf evaluate``:
validity (the guide's own prediction), oracle target agreement for two independent oracles (a
wide CNN and a CNN with another seed), L1/L2, the perceptual distance and Frechet distance to
real test images of the target class on the wide oracle's features (``no edit`` and ``real
floor`` rows), COUT and seconds per counterfactual.

The study's three findings are checked on the grid and reported as holds / does not hold with
the numbers (they need the settings' full grid; a finding whose runs are missing is skipped):

1. *cone off*: for the non-robust guides (standard, DUQ) the mean OTA drops without the cone
   while validity moves by at most ``validity_tolerance``;
2. *x0-prediction off*: for the non-robust guides validity drops;
3. *random guide with the cone*: OTA above ``chance`` (1/classes): the robust model's semantics
   leak into the counterfactuals.

The goal row: the diffusion method (DVCE with/without cone, FastDiME, ACE) with the highest OTA
on the standard CNN, against validity >= 0.95, OTA >= 0.90, FID to real target-class images
below the unchanged queries', and DISC's OTA and seconds per counterfactual on the same queries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from lit_cf.errors import UserError
from lit_cf.explainers.dvce import X0_OFF_INPUTS
from lit_cf.studies.ablate_disc import SMALL_DUQ, check_data_overrides, init_args
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study, require_positive

__all__ = ["DIFFUSION_METHODS", "GUIDES", "METHODS", "Vaeth", "findings", "goal"]

GUIDES = ("standard", "robust", "random", "duq")
METHODS = ("pixel", "deepinversion", "disc", "latent_attack", "dvce", "dvce_cone", "fastdime", "ace")
DIFFUSION_METHODS = ("dvce", "dvce_cone", "fastdime", "ace")
NON_ROBUST = ("standard", "duq")
#: DVCE arguments the grid sets itself (from its settings), so not allowed in ``grid_args``
GRID_OWN = tuple(
    f"model.init_args.{k}"
    for k in ("diffusion", "tau", "num_steps", "x0_prediction", "cone", "robust_classifier", "x0_off_input")
)
#: evaluate's overall keys shown in the tables, with their column names
COLUMNS = (
    ("n", "n"),
    ("flip_rate", "validity"),
    ("ota_wide", "OTA wide"),
    ("ota_cnn", "OTA cnn"),
    ("l1_mean", "L1"),
    ("l2_mean", "L2"),
    ("perceptual_domain_mean", "perceptual"),
    ("fid_real_domain", "FID real"),
    ("cout_mean", "COUT"),
    ("seconds_per_cf_mean", "s/cf"),
)


def grid_name(guide: str, cone: bool, x0: bool, x0_off_input: str = "x0_hat") -> str:
    off = "nox0" if x0_off_input == "x0_hat" else "nox0xt"
    return f"dvce-{guide}-{'cone' if cone else 'nocone'}-{'x0' if x0 else off}"


def _ota(row: Mapping[str, Any]) -> float:
    return (float(row["OTA wide"]) + float(row["OTA cnn"])) / 2


def findings(grid: Mapping[tuple[str, bool, bool], Mapping[str, Any]], tolerance: float, chance: float) -> list[dict[str, Any]]:
    """The study's three findings on the grid rows (keyed by guide, cone, x0-prediction)."""
    out: list[dict[str, Any]] = []
    for guide in NON_ROBUST:
        on, off = grid.get((guide, True, True)), grid.get((guide, False, True))
        if on is not None and off is not None:
            d_ota, d_val = _ota(off) - _ota(on), float(off["validity"]) - float(on["validity"])
            out.append(
                {
                    "finding": f"cone off, {guide}: OTA drops, validity barely moves",
                    "holds": d_ota < 0 and abs(d_val) <= tolerance,
                    "numbers": f"OTA {_ota(on):.3f} -> {_ota(off):.3f}, "
                    f"validity {float(on['validity']):.3f} -> {float(off['validity']):.3f}",
                }
            )
        x0, no_x0 = grid.get((guide, False, True)), grid.get((guide, False, False))
        if x0 is not None and no_x0 is not None:
            out.append(
                {
                    "finding": f"x0-prediction off, {guide}: validity drops",
                    "holds": float(no_x0["validity"]) < float(x0["validity"]),
                    "numbers": f"validity {float(x0['validity']):.3f} -> {float(no_x0['validity']):.3f}",
                }
            )
    rnd = grid.get(("random", True, True))
    if rnd is not None:
        out.append(
            {
                "finding": "random guide with the cone: OTA above chance (robust semantics leak in)",
                "holds": _ota(rnd) > chance,
                "numbers": f"OTA {_ota(rnd):.3f} (chance {chance:.3f}), validity {float(rnd['validity']):.3f}",
            }
        )
    return out


def goal(rows: Mapping[str, Mapping[str, Any]], no_edit_fid: float | None) -> dict[str, Any] | None:
    """The diffusion method with the best mean OTA against the goal, and DISC on the same queries."""
    diffusion = {m: r for m, r in rows.items() if m in DIFFUSION_METHODS}
    if not diffusion:
        return None
    best = max(diffusion, key=lambda m: _ota(diffusion[m]))
    r = diffusion[best]
    checks = {
        "validity >= 0.95": float(r["validity"]) >= 0.95,
        "OTA >= 0.90 (both oracles)": min(float(r["OTA wide"]), float(r["OTA cnn"])) >= 0.90,
        "FID real below no edit": no_edit_fid is not None and float(r["FID real"]) < no_edit_fid,
    }
    disc = rows.get("disc")
    if disc is not None:
        checks["OTA at least DISC's"] = _ota(r) >= _ota(disc)
        checks["cheaper than DISC"] = float(r["s/cf"]) < float(disc["s/cf"])
    return {"method": best, "reached": all(checks.values()), "checks": checks}


@register_study
class Vaeth(Study):
    """Diffusion counterfactuals (DVCE) guided by standard, robust, random and DUQ classifiers, with
    and without the cone and x0-prediction, and every lit-cf method on the same queries.

    See the module docstring for the design. Models are trained by the study (kept in
    ``<output_dir>/models`` and reused): the standard CNN, the robust CNN, a randomly initialised
    CNN (one batch at learning rate 0: the initial weights of its seed), a small DUQ model, two
    oracles, an autoencoder (LatentAttack) and, unless ``diffusion`` names one, the DDPM.

    Args:
        root: Data root holding ``MNIST/``.
        queries: Test queries (the first ones the standard CNN classifies correctly).
        epochs: Epochs of the standard, robust and oracle CNNs.
        duq_epochs: Epochs of the DUQ model.
        ae_epochs: Epochs of the autoencoder (LatentAttack's generator).
        train_limit: Train the classifiers, DUQ model and autoencoder on the first N images only.
        diffusion: A DDPM checkpoint of MNIST (``lit-cf fit`` with ``model/ddpm_mnist.yaml``);
            ``null`` trains one with ``ddpm_config`` for ``ddpm_epochs``.
        ddpm_config: The DDPM's model config when the study trains it.
        ddpm_epochs: Its epochs.
        guides: Guiding classifiers of the grid, from ``standard``, ``robust``, ``random``, ``duq``.
        cones: Cone settings of the grid (``[false, true]``).
        x0_predictions: x0-prediction settings of the grid (``[true, false]``).
        x0_off_input: What the classifier sees in the cells without x0-prediction: ``x0_hat``
            (the gradient taken at the clean estimate) or ``x_t`` (the noisy sample, plain
            classifier guidance); see :class:`lit_cf.explainers.DVCE`.
        grid_args: Dotted ``model.init_args.*`` overrides of DVCE in every grid cell, e.g.
            ``{model.init_args.classifier_weight: 0.5}`` (the grid's own settings, tau, steps,
            guide, cone and x0-prediction, are set by the settings above, not here). A grid cell
            reuses the methods table's ``dvce`` / ``dvce_cone`` run only when that method's
            ``method_args`` equal ``grid_args``.
        tau: DVCE's noise level.
        num_steps: DVCE's steps (and the default of the methods table's DVCE runs).
        methods: The methods table, from ``pixel``, ``deepinversion``, ``disc``,
            ``latent_attack``, ``dvce``, ``dvce_cone``, ``fastdime``, ``ace`` (empty: no table).
        method_args: Per method, dotted explain overrides on top of its shipped config (e.g.
            ``{fastdime: {model.init_args.num_steps: 30}}``).
        validity_tolerance: Largest validity change that counts as "barely moves" (finding 1).
        chunk_size: Records optimised together.
        data_overrides: Dotted ``data.init_args.*`` overrides of every fit, explain and evaluation.
        accelerator: Lightning accelerator.
        seed: Seed of the explain runs.
    """

    name: ClassVar[str] = "vaeth"

    def __init__(
        self,
        root: str = "data",
        queries: int = 200,
        epochs: int = 2,
        duq_epochs: int = 1,
        ae_epochs: int = 3,
        train_limit: int | None = None,
        diffusion: str | None = None,
        ddpm_config: str = "model/ddpm_mnist.yaml",
        ddpm_epochs: int = 5,
        guides: list[str] | None = None,
        cones: list[bool] | None = None,
        x0_predictions: list[bool] | None = None,
        x0_off_input: str = "x0_hat",
        grid_args: dict[str, Any] | None = None,
        tau: float = 0.5,
        num_steps: int = 100,
        methods: list[str] | None = None,
        method_args: dict[str, dict[str, Any]] | None = None,
        validity_tolerance: float = 0.05,
        chunk_size: int = 50,
        data_overrides: dict[str, Any] | None = None,
        accelerator: str = "auto",
        seed: int = 0,
    ) -> None:
        self.guides = list(GUIDES) if guides is None else list(guides)
        self.cones = [False, True] if cones is None else list(cones)
        self.x0s = [True, False] if x0_predictions is None else list(x0_predictions)
        self.methods = list(METHODS) if methods is None else list(methods)
        self.method_args = dict(method_args or {})
        problems = []
        if not self.guides or any(g not in GUIDES for g in self.guides) or len(set(self.guides)) != len(self.guides):
            problems.append(f"guides must be distinct names from {list(GUIDES)}, got {self.guides}")
        if not self.cones or not self.x0s:
            problems.append("cones and x0_predictions need at least one value each")
        if x0_off_input not in X0_OFF_INPUTS:
            problems.append(f"x0_off_input must be one of {list(X0_OFF_INPUTS)}, got {x0_off_input!r}")
        self.x0_off_input = x0_off_input
        self.grid_args = dict(grid_args or {})
        own = sorted(k for k in self.grid_args if k in GRID_OWN or not k.startswith("model.init_args."))
        if own:
            problems.append(
                f"grid_args may only hold DVCE's model.init_args.* overrides other than the grid's own "
                f"({', '.join(GRID_OWN)}: use the settings tau, num_steps, guides, cones, x0_predictions, "
                f"x0_off_input), got {own}"
            )
        if any(m not in METHODS for m in self.methods) or len(set(self.methods)) != len(self.methods):
            problems.append(f"methods must be distinct names from {list(METHODS)}, got {self.methods}")
        if any(m not in METHODS for m in self.method_args):
            problems.append(f"method_args names unknown methods {sorted(set(self.method_args) - set(METHODS))}")
        if not 0 < tau <= 1:
            problems.append(f"tau must be in (0, 1], got {tau}")
        if diffusion is not None and not Path(diffusion).is_file():
            problems.append(
                f"diffusion checkpoint not found: {diffusion} (train one: lit-cf fit --config "
                "configs/data/mnist.yaml --config configs/model/ddpm_mnist.yaml, or set diffusion: null)"
            )
        if problems:
            raise UserError("vaeth: " + "; ".join(problems))
        require_positive(
            queries=queries,
            epochs=epochs,
            duq_epochs=duq_epochs,
            ae_epochs=ae_epochs,
            ddpm_epochs=ddpm_epochs,
            num_steps=num_steps,
            chunk_size=chunk_size,
            train_limit=train_limit,
        )
        self.data_overrides = check_data_overrides("vaeth", data_overrides)
        if not (Path(root) / "MNIST").is_dir():
            raise UserError(f"vaeth: no MNIST folder under {root}; run: bash scripts/prepare_data.sh ../shared/data {root}")
        self.root, self.queries, self.epochs, self.duq_epochs, self.ae_epochs = root, queries, epochs, duq_epochs, ae_epochs
        self.train_limit, self.diffusion, self.ddpm_config, self.ddpm_epochs = train_limit, diffusion, ddpm_config, ddpm_epochs
        self.tau, self.num_steps, self.validity_tolerance = tau, num_steps, validity_tolerance
        self.chunk_size, self.seed = chunk_size, seed

    # ------------------------------------------------------------------ models
    def data_args(self) -> dict[str, Any]:
        return {"data.init_args.root": self.root, **self.data_overrides}

    def model_specs(self) -> dict[str, ModelSpec]:
        """Every model but the DDPM (which needs the standard CNN's checkpoint for its round trip)."""
        limit = {"data.init_args.limit": self.train_limit} if self.train_limit else {}

        def spec(name: str, model: str, epochs: int, seed: int, extra: Mapping[str, Any] | None = None) -> ModelSpec:
            args = {**self.data_args(), **limit, **(extra or {}), "trainer.max_epochs": epochs, "seed_everything": seed}
            return ModelSpec(name, ("data/mnist.yaml", model), args)

        specs = {
            "standard": spec("standard", "model/cnn.yaml", self.epochs, 0),
            "robust": spec("robust", "model/robust_cnn.yaml", self.epochs, 0),
            # one batch at learning rate 0: the checkpoint holds the seed's initial weights
            "random": spec(
                "random",
                "model/cnn.yaml",
                1,
                5,
                {"trainer.limit_train_batches": 1, "model.init_args.optimizer.init_args.lr": 0.0},
            ),
            "duq": spec("duq", "model/duq_cnn.yaml", self.duq_epochs, 0, SMALL_DUQ),
            "wide": spec("wide", "model/cnn_wide.yaml", self.epochs, 2),
            "cnn": spec("cnn", "model/cnn.yaml", self.epochs, 3),
        }
        if "latent_attack" in self.methods:
            specs["autoencoder"] = spec("autoencoder", "model/autoencoder.yaml", self.ae_epochs, 0)
        return specs

    def ddpm(self, ctx: StudyContext, standard: Path) -> Path:
        if self.diffusion is not None:
            return Path(self.diffusion)
        args = {
            **self.data_args(),
            "model.init_args.classifier": standard,
            "trainer.max_epochs": self.ddpm_epochs,
            "seed_everything": 0,
        }
        return ctx.fit(ModelSpec("ddpm", ("data/mnist.yaml", self.ddpm_config), args))

    # ------------------------------------------------------------------ queries and targets
    def queries_and_targets(self, standard: Path) -> dict[str, Any]:
        """The first ``queries`` test images the standard CNN gets right, and its most likely other class."""
        import torch

        from lit_cf.data import MNISTDataModule
        from lit_cf.explainers.targets import resolve_targets
        from lit_cf.models.base import ImageClassifier
        from lit_cf.utils.checkpoint import load_module

        test = MNISTDataModule(**{**init_args(self.data_overrides), "root": self.root, "download": False}).dataset("test")
        model = load_module(standard, ImageClassifier).eval()
        indices: list[int] = []
        targets: dict[str, int] = {}
        start, n = 0, len(test)  # type: ignore[arg-type]  # a map-style dataset
        while len(indices) < self.queries and start < n:
            batch = range(start, min(start + 512, n))
            images = torch.stack([test[i]["image"] for i in batch])
            labels = torch.tensor([int(test[i]["label"]) for i in batch])
            with torch.no_grad():
                probs = model.probabilities(images).float()
            pred = probs.argmax(-1)
            for j, other in resolve_targets("most_likely_other", probs, labels, list(batch), probs.shape[-1]):
                if pred[j] == labels[j] and len(indices) < self.queries:
                    indices.append(batch[j])
                    targets[str(batch[j])] = other
            start += 512
        if not indices:
            raise UserError("vaeth: the standard CNN classifies no test image correctly; train it longer (epochs)")
        return {"indices": indices, "targets": targets}

    # ------------------------------------------------------------------ explain
    def common(self, chosen: Mapping[str, Any], target_file: Path) -> dict[str, Any]:
        return {
            **self.data_args(),
            "indices": chosen["indices"],
            "target": "file",
            "target_file": target_file,
            "on_source_equals_target": "skip",
            "chunk_size": self.chunk_size,
            "seed": self.seed,
        }

    def dvce_args(self, ckpt: Mapping[str, Path], guide: str, cone: bool, x0: bool) -> dict[str, Any]:
        args: dict[str, Any] = {
            "classifier": ckpt[guide],
            "model.init_args.diffusion": ckpt["ddpm"],
            "model.init_args.tau": self.tau,
            "model.init_args.num_steps": self.num_steps,
            "model.init_args.x0_prediction": x0,
            "model.init_args.cone": cone,
        }
        if cone:
            args["model.init_args.robust_classifier"] = ckpt["robust"]
        if not x0 and self.x0_off_input != "x0_hat":
            args["model.init_args.x0_off_input"] = self.x0_off_input
        return args

    def grid_cell_args(self, ckpt: Mapping[str, Path], guide: str, cone: bool, x0: bool) -> dict[str, Any]:
        """DVCE's arguments in one grid cell: :meth:`dvce_args` plus ``grid_args``."""
        return {**self.dvce_args(ckpt, guide, cone, x0), **self.grid_args}

    def method_run_args(self, method: str, ckpt: Mapping[str, Path]) -> tuple[str, dict[str, Any]]:
        """(explain config, arguments) of one method of the table (on the standard CNN)."""
        if method in ("dvce", "dvce_cone"):
            args = self.dvce_args(ckpt, "standard", method == "dvce_cone", True)
            return "explain/dvce.yaml", {**args, **self.method_args.get(method, {})}
        args = {"classifier": ckpt["standard"]}
        if method in ("fastdime", "ace"):
            args["model.init_args.diffusion"] = ckpt["ddpm"]
        elif method == "disc":
            args["model.init_args.duq"] = ckpt["duq"]
        elif method == "latent_attack":
            args["model.init_args.generator"] = ckpt["autoencoder"]
        return f"explain/{method}.yaml", {**args, **self.method_args.get(method, {})}

    def same_as_method(self, key: tuple[str, bool, bool]) -> str | None:
        """The methods-table run a grid cell (guide, cone, x0-prediction) equals, if any.

        ``dvce`` and ``dvce_cone`` are DVCE on the standard CNN with x0-prediction and the cone
        off / on: the same arguments as those grid cells when its ``method_args`` equal ``grid_args``.
        """
        guide, cone, x0 = key
        method = "dvce_cone" if cone else "dvce"
        if guide == "standard" and x0 and method in self.methods and self.method_args.get(method, {}) == self.grid_args:
            return method
        return None

    # ------------------------------------------------------------------ run
    def run(self, ctx: StudyContext) -> StudyResult:
        from lit_cf.runs import atomic_write_text

        ckpt = {name: ctx.fit(spec) for name, spec in self.model_specs().items()}
        ckpt["ddpm"] = self.ddpm(ctx, ckpt["standard"])
        chosen = ctx.cached(
            "queries",
            {"standard": str(ckpt["standard"]), "queries": self.queries},
            lambda: self.queries_and_targets(ckpt["standard"]),
        )
        target_file = ctx.out / "targets.json"
        if not target_file.exists() or json.loads(target_file.read_text()) != chosen["targets"]:
            atomic_write_text(target_file, json.dumps(chosen["targets"], sort_keys=True))
        common = self.common(chosen, target_file)
        data = ("data/mnist.yaml",)
        eval_args = {
            **self.data_args(),
            "oracles": {"wide": str(ckpt["wide"]), "cnn": str(ckpt["cnn"])},
            "feature_network": ckpt["wide"],
            "duq": ckpt["duq"],
            "reference": "test",
        }

        # the methods table first (its goal row is the study's headline); its DVCE runs are the
        # grid's standard-guide runs with the same arguments, so the grid reuses them
        method_rows: dict[str, dict[str, Any]] = {}
        metrics: dict[str, Any] = {}
        method_runs: dict[str, Path] = {}
        for method in self.methods:
            config, args = self.method_run_args(method, ckpt)
            method_runs[method] = ctx.explain(f"method-{method}", (*data, config), {**args, **common})
        if method_runs:
            metrics = ctx.evaluate("methods", method_runs, eval_args, configs=data)
            for method in method_runs:
                overall = metrics["runs"][method]["overall"]
                method_rows[method] = {
                    "part": "methods",
                    "run": method,
                    **{col: overall.get(k, float("nan")) for k, col in COLUMNS},
                }

        # the grid
        grid_runs: dict[tuple[str, bool, bool], Path] = {}
        for guide in self.guides:
            for cone in self.cones:
                if cone and guide == "robust":
                    continue  # a cone around the robust gradient itself changes nothing
                for x0 in self.x0s:
                    same = self.same_as_method((guide, cone, x0))
                    if same is not None:  # a method of the table, so already in method_runs
                        grid_runs[(guide, cone, x0)] = method_runs[same]
                        continue
                    grid_runs[(guide, cone, x0)] = ctx.explain(
                        grid_name(guide, cone, x0, self.x0_off_input),
                        (*data, "explain/dvce.yaml"),
                        {**self.grid_cell_args(ckpt, guide, cone, x0), **common},
                    )
        names = {k: grid_name(*k, self.x0_off_input) for k in grid_runs}
        # the x_t reading has its own evaluation folder: both grids of one output folder are kept
        grid_eval = "grid" if self.x0_off_input == "x0_hat" else "grid-xt"
        grid_metrics = ctx.evaluate(grid_eval, {names[k]: v for k, v in grid_runs.items()}, eval_args, configs=data)
        grid_rows: dict[tuple[str, bool, bool], dict[str, Any]] = {}
        off = "off" if self.x0_off_input == "x0_hat" else "off (classifier on x_t)"
        for key in grid_runs:
            overall = grid_metrics["runs"][names[key]]["overall"]
            grid_rows[key] = {
                "part": "grid",
                "run": f"DVCE {key[0]}, cone {'on' if key[1] else 'off'}, x0-prediction {'on' if key[2] else off}",
                **{col: overall.get(k, float("nan")) for k, col in COLUMNS},
            }

        # the no-edit and floor rows (the same queries and reference sample in both evaluations)
        first = next(iter((metrics if self.methods else grid_metrics)["runs"].values()))["overall"]
        no_edit, floor = first.get("fid_real_domain_no_edit"), first.get("fid_real_domain_floor")

        rows = [*grid_rows.values(), *method_rows.values()]
        blank = {col: float("nan") for _, col in COLUMNS}
        for label, value in (("no edit (queries)", no_edit), ("real floor", floor)):
            if value is not None:
                rows.append({"part": "reference", "run": label, **blank, "FID real": value})
        found = findings(grid_rows, self.validity_tolerance, chance=0.1)
        reached = goal(method_rows, no_edit)
        notes = [
            f"{len(chosen['indices'])} MNIST test queries the standard CNN classifies correctly; target: its most likely "
            f"other class for every run; DVCE tau {self.tau}, {self.num_steps} steps"
            + (f"; grid cells with {json.dumps(self.grid_args, sort_keys=True)}" if self.grid_args else ""),
            *(f"finding: {f['finding']}: {'holds' if f['holds'] else 'does not hold'} ({f['numbers']})" for f in found),
        ]
        if reached is not None:
            checks = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in reached["checks"].items())
            status = "reached" if reached["reached"] else "not reached"
            notes.append(f"goal ({reached['method']}, the diffusion method with the best OTA): {status} ({checks})")
        verdict = {"findings": found, "goal": reached}
        return StudyResult(
            rows=rows, verdict=verdict, passed=None, notes=notes, report=ctx.out / "evaluate" / grid_eval / "report.html"
        )
