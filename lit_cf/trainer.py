"""The Trainer behind ``lit-cf``: Lightning's, plus the ``explain`` verb."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.engine import run_explain
from lit_cf.metrics.checks import EvaluateRequest
from lit_cf.metrics.suite import evaluate as evaluate_runs


class LitCFTrainer(L.Trainer):
    """``lightning.Trainer`` with :meth:`explain`; every Trainer option works as usual."""

    explain_config_yaml: str | None = None
    evaluate_config_yaml: str | None = None

    def explain(
        self,
        model: CounterfactualMethod,
        datamodule: L.LightningDataModule,
        classifier: dict[str, Any] | str,
        output_dir: str,
        split: str = "test",
        indices: list[int] | None = None,
        num_queries: int | None = None,
        source_class: int | None = None,
        select: str = "all",
        target: int | list[int] | str = "most_likely_other",
        target_file: str | None = None,
        on_source_equals_target: str = "error",
        chunk_size: int = 128,
        seed: int = 0,
        overwrite: bool = False,
        num_grid_images: int = 32,
    ) -> Path:
        """Generate counterfactuals of a trained classifier for queries from ``datamodule``.

        The method (``--model``) optimises per-image latents inside the predict loop, so the
        trainer's accelerator, devices, strategy (e.g. ``ddp``: queries are sharded across
        ranks) and precision apply. Output is written chunk by chunk and atomically: re-running
        the same command after an interruption resumes; a finished directory is left alone
        unless ``overwrite`` is true. Progress goes to stderr, one line per committed chunk
        (records done, running success rate, time per record, time left; chunks of an earlier
        interrupted run are counted as resumed).

        Args:
            model: The counterfactual method (``class_path`` + ``init_args``), e.g.
                ``lit_cf.explainers.PixelCounterfactual``.
            datamodule: Where the queries come from (any lit-cf datamodule).
            classifier: The classifier to explain: a ``.ckpt`` written by ``lit-cf fit``; a
                TorchScript file (recognised from its content); or a mapping for any
                ``nn.Module``: ``{module: {class_path: torchvision.models.resnet18, init_args:
                {num_classes: 3}}, weights: model.safetensors, input_mean: [0.485, 0.456,
                0.406], input_std: [0.229, 0.224, 0.225], output: logits, class_names: [cat,
                dog, fox]}``. ``weights``: ``.safetensors``, a weights-only ``.pt``/``.pth``
                state dict or a TorchScript file; ``input_mean``/``input_std`` (optional) are
                applied inside the wrapper, so counterfactuals stay in ``[0, 1]``; ``output``
                is ``logits``, ``probabilities`` or ``binary_logit`` (one logit: two classes);
                ``class_names`` optional. ``{path: model.ts, input_mean: ..., output: ...}``
                gives normalisation to a TorchScript file. The run records the source
                (path, SHA-256, class path).
            output_dir: Run directory (created; must be new, empty, or an earlier run of the
                same command).
            split: Split of ``datamodule`` to explain (``train``, ``val``, ``test``, ...).
            indices: Explicit dataset indices within ``split`` (default: the whole split).
            num_queries: Keep only the first this many selected queries.
            source_class: Keep only queries whose true label is this class.
            select: ``all`` queries, only ``correct``ly classified or only ``misclassified``.
            target: Target rule: a class index; a list of class indices (several targets per
                query); ``most_likely_other`` (most probable class but the predicted one);
                ``most_likely_others:K`` (the K most probable classes but the predicted one);
                ``flip`` (binary classifiers); ``all`` (every other class); ``label`` (the
                true label); ``file`` (per-image targets from ``target_file``).
            target_file: JSON ``{"<index>": target or [targets]}`` or CSV ``index,target``
                for the ``file`` rule.
            on_source_equals_target: ``error`` or ``skip`` when a rule names the class the
                classifier already predicts.
            chunk_size: Records optimised together in one batch (a fixed partition of the
                records). Images are independent of their chunk-mates, but a different chunk
                size can change float rounding, which Adam may amplify in pixels whose gradient
                is near zero; keep it fixed to reproduce a run bit for bit.
            seed: Seed of every random choice of the method (per-record seeds derive from it).
            overwrite: Replace a finished or different run in ``output_dir``.
            num_grid_images: Records drawn in the PNG grids (query | counterfactual | difference).
        """
        return run_explain(
            self,
            model,
            datamodule,
            classifier=classifier,
            output_dir=output_dir,
            split=split,
            indices=indices,
            num_queries=num_queries,
            source_class=source_class,
            select=select,
            target=target,
            target_file=target_file,
            on_source_equals_target=on_source_equals_target,
            chunk_size=chunk_size,
            seed=seed,
            overwrite=overwrite,
            num_grid_images=num_grid_images,
            config_yaml=self.explain_config_yaml,
        )

    def evaluate(
        self,
        datamodule: L.LightningDataModule,
        runs: list[str],
        output_dir: str,
        oracles: dict[str, dict[str, Any] | str] | None = None,
        feature_network: dict[str, Any] | str | None = None,
        duq: str | None = None,
        descriptors: str | None = None,
        classifier: dict[str, Any] | str | None = None,
        names: list[str] | None = None,
        batch_size: int = 256,
        cout_steps: int = 50,
        num_grid_images: int = 8,
        overwrite: bool = False,
        reference: str | None = "test",
        reference_seed: int = 0,
    ) -> Path:
        """Score explain runs with the counterfactual metric suite and write a report.

        Writes ``metrics.json`` (overall and per source->target pair), ``metrics.md`` (the
        comparison table, one row per run) and a self-contained ``report.html``. Each run is
        checked against the data (dataset, shapes, the stored queries) and against the
        classifier it explained (checksum), so mismatched inputs fail instead of skewing numbers.

        Args:
            datamodule: The data the runs were explained on.
            runs: Explain run directories; several are evaluated together into one table.
            output_dir: Folder for metrics and report (new or empty unless ``overwrite``).
            oracles: ``{name: classifier}`` of independently trained classifiers, each a
                source as for ``explain --classifier`` (``.ckpt``, TorchScript or a module
                mapping); OS_k/OTA_k per oracle (an oracle identical to the explained
                classifier is masked).
            feature_network: A classifier (any source as above) whose features give
                ``fid_domain``, ``sfid_domain`` and ``perceptual_domain`` (not Inception or VGG:
                none is available offline, and the names say so). For a module that lit-cf
                did not train, a mapping may name ``feature_layers`` (e.g. ``[net.layer1,
                net.layer2]``); otherwise one layer per resolution stage is chosen, and
                ``metrics.json`` says which.
            duq: Checkpoint of a DUQ model: certainty of counterfactuals and queries.
            descriptors: Checkpoint of a :class:`~lit_cf.models.DescriptorPredictor`: MNAC
                (and CD when the data has a binary target attribute); on the rendered digits
                with a factor regressor, ground-truth scores (``gt_nuisance_change``: did the
                counterfactual leave the nuisance factors alone; ``gt_change_<factor>``).
            classifier: The explained classifier, when the run cannot rebuild it alone (a
                module mapping: its class path is only ever taken from the command line or
                config) or to point at a moved file; its weights must be the ones the runs
                recorded (checksum).
            names: Row names for the runs (default: the run folder names).
            batch_size: Images per metric batch.
            cout_steps: Insertion steps of COUT.
            num_grid_images: Records shown per run in the report's grids.
            overwrite: Write into a non-empty ``output_dir``.
            reference: Split of real images for realism against real images (needs
                ``feature_network``): ``fid_real_domain`` is the Frechet distance on the feature
                network between the counterfactuals and a sample of real images of each
                counterfactual's target class (one per counterfactual, queries excluded); the
                table adds a ``no edit (queries)`` row (the unchanged queries against the same
                sample) and a ``real floor`` row (a disjoint real sample of the same size and
                classes). ``null`` skips it.
            reference_seed: Seed of the real samples (recorded in ``metrics.json``).
        """
        request = EvaluateRequest(
            runs=list(runs),
            output_dir=output_dir,
            oracles=dict(oracles or {}),
            feature_network=feature_network,
            duq=duq,
            descriptors=descriptors,
            classifier=classifier,
            names=names,
            batch_size=batch_size,
            cout_steps=cout_steps,
            num_grid_images=num_grid_images,
            overwrite=overwrite,
            config_yaml=self.evaluate_config_yaml,
            reference=reference,
            reference_seed=reference_seed,
        )
        return evaluate_runs(self, datamodule, request)
