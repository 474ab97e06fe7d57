"""The Trainer behind ``lit-cf``: Lightning's, plus the ``explain`` verb."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.engine import run_explain


class LitCFTrainer(L.Trainer):
    """``lightning.Trainer`` with :meth:`explain`; every Trainer option works as usual."""

    explain_config_yaml: str | None = None

    def explain(
        self,
        model: CounterfactualMethod,
        datamodule: L.LightningDataModule,
        classifier: str,
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
        unless ``overwrite`` is true.

        Args:
            model: The counterfactual method (``class_path`` + ``init_args``), e.g.
                ``lit_cf.explainers.PixelCounterfactual``.
            datamodule: Where the queries come from (any lit-cf datamodule).
            classifier: Checkpoint (``.ckpt``) of the classifier to explain, written by
                ``lit-cf fit``; its class is read from the checkpoint.
            output_dir: Run directory (created; must be new, empty, or an earlier run of the
                same command).
            split: Split of ``datamodule`` to explain (``train``, ``val``, ``test``, ...).
            indices: Explicit dataset indices within ``split`` (default: the whole split).
            num_queries: Keep only the first this many selected queries.
            source_class: Keep only queries whose true label is this class.
            select: ``all`` queries, only ``correct``ly classified or only ``misclassified``.
            target: Target rule: a class index; a list of class indices (several targets per
                query); ``most_likely_other`` (most probable class but the predicted one);
                ``flip`` (binary classifiers); ``all`` (every other class); ``label`` (the
                true label); ``file`` (per-image targets from ``target_file``).
            target_file: JSON ``{"<index>": target or [targets]}`` or CSV ``index,target``
                for the ``file`` rule.
            on_source_equals_target: ``error`` or ``skip`` when a rule names the class the
                classifier already predicts.
            chunk_size: Records optimised together in one batch (a fixed partition of the
                records: results do not depend on it beyond float tolerance).
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
