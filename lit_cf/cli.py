"""The ``lit-cf`` command: Lightning's CLI with lit-cf's models, datamodules and verbs.

``fit``, ``validate``, ``test`` and ``predict`` are stock LightningCLI subcommands in subclass
mode: YAML picks any LightningModule / LightningDataModule by ``class_path``. ``explain`` is a
method of :class:`~lit_cf.trainer.LitCFTrainer` whose signature and docstring are its
``--help``. Configs are layered with repeated ``--config`` (see ``configs/``). ``study``
runs a study of :mod:`lit_cf.studies` (``lit-cf study --config configs/study/<name>.yaml``).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, cast

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from lit_cf.callbacks import SampleGridLogger
from lit_cf.errors import UserError
from lit_cf.trainer import LitCFTrainer
from lit_cf.utils.boundary import CreatedPaths, user_message

DEBUG_ENV = "LIT_CF_DEBUG"


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
        cast(LitCFTrainer, self.trainer).explain_config_yaml = self.parser.dump(self.config, skip_none=False)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "evaluate":
            kwargs.pop("model", None)  # evaluate loads its models from checkpoints
        if kwargs.get("ckpt_path"):
            kwargs["weights_only"] = True  # Lightning's own load of --ckpt_path: no unpickling either
        return kwargs

    def before_evaluate(self) -> None:
        cast(LitCFTrainer, self.trainer).evaluate_config_yaml = self.parser.dump(self.config, skip_none=False)

    # ----------------------------------------------------------- error boundary (issue 14)
    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a constructor's refusal (``ValueError``, a missing
        file) is the user's to fix and becomes one error line."""
        from lit_cf.cli_checks import check_trainer_config

        check_trainer_config(self.config.get(self.subcommand, self.config) if self.subcommand else self.config)
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except (ValueError, TypeError, OSError) as err:
            cause = _root_cause(err)  # jsonargparse wraps the constructor's own message
            message = user_message(cause) or (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise UserError(f"invalid settings: {message}") from err

    def _parse_ckpt_path(self) -> None:
        # --ckpt_path of fit/validate/test/predict: read weights-only, every class path checked,
        # before LightningCLI parses (and imports) the hyperparameters it holds
        from lit_cf.cli_checks import check_ckpt_path

        check_ckpt_path(self.config)
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        from lit_cf.cli_checks import check_before_run

        created = CreatedPaths()
        if subcommand != "explain":  # a failed explain keeps its committed chunks to resume
            for path in _output_paths(self.trainer):
                created.watch(path)
        try:
            check_before_run(subcommand, self)  # data and num_classes: before any logger folder exists
            super()._run_subcommand(subcommand)
        except Exception as err:
            if user_message(err) is not None:
                created.remove_new()
            raise


CLI_DESCRIPTION = "lit-cf: train image classifiers and explain them with visual counterfactuals."
CLI_EPILOG = (
    "One more subcommand: study (lit-cf study --config configs/study/<name>.yaml) runs a whole "
    "experiment of lit_cf.studies (fit, explain, evaluate); lit-cf study --config ... --help lists its settings."
)


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
        parser_kwargs={"description": CLI_DESCRIPTION, "epilog": CLI_EPILOG},
    )


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (the constructor's own error under jsonargparse's)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _output_paths(trainer: Any) -> list[Any]:
    """Folders a verb may create: logger folders, checkpoint folders, ``default_root_dir``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    paths = [trainer.default_root_dir]
    for logger in trainer.loggers:
        # log_dir of these loggers is computed without creating anything; others may start a run
        paths.append(logger.log_dir if isinstance(logger, (CSVLogger, TensorBoardLogger)) else getattr(logger, "save_dir", None))
    paths += [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    return paths


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-cf`` and ``python -m lit_cf``; tests call it in-process with ``args``.

    Every expected failure (a :class:`~lit_cf.errors.UserError`, a missing or damaged file, a
    full disk, permissions; see :func:`lit_cf.utils.boundary.user_message`) prints one line
    ``lit-cf: error: ...`` and exits with status 2, without a traceback; what the failed command
    created is removed. ``--debug`` (or ``LIT_CF_DEBUG=1``) shows the traceback as well.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args is None and "--debug" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--debug"]
        debug = True
    elif isinstance(args, (list, tuple)) and "--debug" in args:
        args = [a for a in args if a != "--debug"]
        debug = True
    argv = sys.argv[1:] if args is None else (list(args) if isinstance(args, (list, tuple)) else [])
    try:
        if argv and argv[0] == "study":  # studies run the verbs above in-process (lit_cf.studies)
            from lit_cf.studies.core import study_main

            status = study_main(argv[1:])
            if status:
                raise SystemExit(status)
            return
        build_cli(args)
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"lit-cf: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
