"""The ``lit-cf`` command: Lightning's CLI with lit-cf's models, datamodules and verbs.

``fit``, ``validate``, ``test`` and ``predict`` are stock LightningCLI subcommands in subclass
mode: YAML picks any LightningModule / LightningDataModule by ``class_path``. ``explain`` is a
method of :class:`~lit_cf.trainer.LitCFTrainer` whose signature and docstring are its
``--help``. Configs are layered with repeated ``--config`` (see ``configs/``).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from lit_cf.callbacks import SampleGridLogger
from lit_cf.errors import UserError
from lit_cf.trainer import LitCFTrainer


class FitConfigSaver(SaveConfigCallback):
    """Save ``config.yaml`` for ``fit`` runs only.

    ``validate``/``test``/``predict`` of a checkpoint would otherwise refuse to run in the
    folder of the fit that made it (the config there already exists); explain writes its own
    config into its run directory.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class LitCFCLI(LightningCLI):
    """LightningCLI with lit-cf defaults: seed 0 recorded in every run, a sample grid at fit start."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "explain": {"model", "datamodule"}, "evaluate": {"datamodule"}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        if subcommand != "evaluate":
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # evaluate reads models from checkpoints: no --model group, only trainer and data
        parser = self.init_parser(**kwargs)
        self.add_default_arguments_to_parser(parser)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        self._subcommand_method_arguments[subcommand] = parser.add_method_arguments(
            klass, subcommand, skip=set(self.subcommands()[subcommand])
        )
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(SampleGridLogger, "sample_grid")

    def before_explain(self) -> None:
        # the resolved config goes into the run directory next to the counterfactuals
        self.trainer.explain_config_yaml = self.parser.dump(self.config, skip_none=False)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "evaluate":
            kwargs.pop("model", None)  # evaluate loads its models from checkpoints
        return kwargs

    def before_evaluate(self) -> None:
        self.trainer.evaluate_config_yaml = self.parser.dump(self.config, skip_none=False)


def build_cli(args: ArgsType = None, run: bool = True) -> LitCFCLI:
    """Build (and with ``run=True`` execute) the CLI; notebooks use ``run=False``."""
    return LitCFCLI(
        LightningModule,
        LightningDataModule,
        trainer_class=LitCFTrainer,
        save_config_callback=FitConfigSaver,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-cf`` and ``python -m lit_cf``; tests call it in-process with ``args``.

    Bad input (a :class:`~lit_cf.errors.UserError`) prints one line and exits with status 2.
    """
    try:
        build_cli(args)
    except UserError as err:
        print(f"lit-cf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
