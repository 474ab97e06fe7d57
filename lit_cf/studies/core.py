"""Studies: experiments that train, explain, evaluate and judge, in-process, resumable.

A study is a :class:`Study` subclass registered by name (:func:`register_study`); its typed
``__init__`` keyword arguments are its settings. ``lit-cf study --config FILE`` reads a study
config (``study: <registered name>``, ``output_dir``, ``settings``), validates the settings
against that signature, and runs the study with a :class:`StudyContext`, which trains models
(:meth:`StudyContext.fit`), explains (:meth:`StudyContext.explain`) and evaluates
(:meth:`StudyContext.evaluate`) through lit-cf's own CLI code, in this process. Everything is
kept in the study's output folder and reused when the same command runs again:

* ``models/<name>-<key>/last.ckpt``: a model, keyed by the contents of its config files and its
  arguments; ``fit.json`` next to it (written atomically after the checkpoint) marks it finished.
  A model whose key is already there is reused, never retrained.
* ``explain/<name>/``: explain runs (explain resumes an interrupted run and leaves a finished one).
* ``evaluate/<name>/``: evaluations (reused when their inputs are unchanged).
* ``cache/<name>.json``: study-specific results with their key (:meth:`StudyContext.cached`).
* ``study.json`` (the study and settings of this folder), ``results.json``, ``results.md``.

Nothing read from a file decides what is imported: a config names a study that is already
registered (the modules of :mod:`lit_cf.studies` register theirs when imported).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from lit_cf.errors import UserError

__all__ = [
    "CONFIG_ROOT",
    "ModelSpec",
    "Study",
    "StudyContext",
    "StudyResult",
    "format_table",
    "register_study",
    "run_study",
    "study_main",
    "study_registry",
]

T = TypeVar("T")

#: ``configs/`` of this checkout: relative config paths of a study are resolved against it.
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
#: entries of an output folder that a study writes (``--overwrite`` removes these, nothing else)
OWNED = ("study.json", "results.json", "results.md", "explain", "evaluate", "cache", "models")
STUDY_FILE = "study.json"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _cli_value(value: Any) -> str:
    """A Python value as the command line writes it (``true``, ``null``, ``[1,2]``, a plain string)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def _cli_args(args: Mapping[str, Any]) -> list[str]:
    return [f"--{key}={_cli_value(value)}" for key, value in args.items()]


def require_positive(**values: int | float | None) -> None:
    """Refuse a study setting below 1 (``None`` means "not given" and passes): one line naming it."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")


def resolve_config(path: str | Path) -> Path:
    """A config path: absolute as given, otherwise relative to the checkout's ``configs/``."""
    p = Path(path)
    if not p.is_absolute():
        p = CONFIG_ROOT / p
    if not p.is_file():
        raise UserError(f"study config {path} not found (looked for {p})")
    return p


def _finished_fit(folder: Path, key: str) -> dict[str, Any] | None:
    """The ``fit.json`` marker of ``folder`` when it holds a finished fit of ``key`` (marker and
    ``last.ckpt``), else None."""
    done = _read_json(folder / "fit.json")
    return done if isinstance(done, dict) and done.get("key") == key and (folder / "last.ckpt").is_file() else None


def _loadable(ckpt: Path) -> bool:
    """Whether ``ckpt`` reads as a Lightning training checkpoint (weights only; a truncated file does not)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:  # any failure to read it means: do not resume from it
        return False
    return isinstance(state, dict) and "state_dict" in state and "loops" in state


def _write_json(path: Path, obj: Any) -> None:
    from lit_cf.runs.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (tips, "GPU available", "Seed set") off while a study's verbs run;
    warnings stay, except two that a study triggers by design."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            # `lit-cf study ...` is in sys.argv while the study passes each verb its own arguments
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_cli(argv: list[str]) -> None:
    """One lit-cf verb in this process (``lit_cf.cli.build_cli``), without Lightning's chatter."""
    from lit_cf.cli import build_cli

    with quiet_lightning():
        build_cli(argv)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ModelSpec:
    """A model a study trains with ``lit-cf fit``.

    Attributes:
        name: Folder name under ``<out>/models/`` (the key is appended).
        configs: Config files (relative to ``configs/`` of the checkout, or absolute).
        args: Dotted overrides, e.g. ``{"trainer.max_epochs": 2, "seed_everything": 1}``.
    """

    name: str
    configs: tuple[str, ...]
    args: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """12 hex digits of the sha256 of the config files' contents and the arguments."""
        contents = [resolve_config(c).read_text() for c in self.configs]
        blob = _canonical({"configs": contents, "args": {k: _cli_value(v) for k, v in self.args.items()}})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class StudyResult:
    """What a study found.

    Attributes:
        rows: The results table: one dict per row, the same keys in every row.
        verdict: The study's judgement (e.g. ``{"pass": True, "why": ..., per-method verdicts}``), if it has one.
        passed: Overall verdict; ``lit-cf study`` exits with status 1 when it is ``False``.
        report: The ``report.html`` the study wrote (through :meth:`StudyContext.evaluate`), if any.
        notes: Lines printed under the table (and written into ``results.md``).
        details: Anything else worth keeping (JSON-serialisable), written into ``results.json``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] | None = None
    passed: bool | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class StudyContext:
    """Runs lit-cf's verbs in this process for a study, inside the study's output folder.

    Args:
        out: The study's output folder.
        accelerator: ``--trainer.accelerator`` of every fit, explain and evaluate.
        log: Where progress lines go (default: print).
        models_from: Output folders of other studies whose finished models of the same key
            (config files' contents and arguments) are copied instead of trained again.
    """

    def __init__(
        self,
        out: Path,
        accelerator: str = "auto",
        log: Callable[[str], None] | None = None,
        models_from: Sequence[Path] = (),
    ) -> None:
        self.out = Path(out)
        self.accelerator = accelerator
        self.models_from = [Path(p) for p in models_from]
        self.log = log or (lambda line: print(line, flush=True))
        self.models: dict[str, dict[str, Any]] = {}  # name -> key, checkpoint, reused, seconds
        self.explains: dict[str, str] = {}
        self.evaluations: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ fit
    def fit(self, spec: ModelSpec) -> Path:
        """Train ``spec`` into ``<out>/models/<name>-<key>/`` and return its ``last.ckpt``.

        In-process ``lit-cf fit`` with the logger off, no sample grid and
        :class:`~lit_cf.studies.resumable_fit.EpochCheckpoint` writing ``last.ckpt`` atomically
        after each epoch. A finished fit of the same key (its ``fit.json`` marker is written
        atomically after the checkpoint) is reused, not retrained; so is one in a
        ``models_from`` folder (copied here, whatever its name there). An interrupted fit (a
        ``last.ckpt`` without ``fit.json``) continues from its last whole epoch (Lightning's
        ``--ckpt_path``: weights, optimizer, schedules and loop state; the data order after the
        resume is not that of an uninterrupted fit); a folder without a checkpoint starts over.
        """
        key = spec.key()
        folder = self.out / "models" / f"{spec.name}-{key}"
        ckpt = folder / "last.ckpt"
        marker = folder / "fit.json"
        done = _finished_fit(folder, key)
        if done is not None:
            self.log(f"study: fit {spec.name}: reusing {ckpt}")
            self.models[spec.name] = {"key": key, "checkpoint": str(ckpt), "reused": True, "seconds": done.get("seconds")}
            return ckpt
        source = self._finished_elsewhere(key)
        if source is not None:
            tmp = folder.with_name(f".{folder.name}.copy")
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(source, tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            self.log(f"study: fit {spec.name}: copied the finished fit {source}")
            seconds = (_read_json(folder / "fit.json") or {}).get("seconds")
            self.models[spec.name] = {
                "key": key,
                "checkpoint": str(ckpt),
                "reused": True,
                "seconds": seconds,
                "copied_from": str(source),
            }
            return ckpt
        resume = ckpt.is_file() and _loadable(ckpt)
        if folder.exists() and not resume:
            shutil.rmtree(folder)  # interrupted before its first epoch ended (or a damaged checkpoint): start clean
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"study: fit {spec.name} -> {folder}" + (f" (resuming from {ckpt})" if resume else ""))
        t0 = time.time()
        argv = [
            "fit",
            *(f"--config={resolve_config(c)}" for c in spec.configs),
            "--trainer.logger=false",
            "--sample_grid.num_samples=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.accelerator={self.accelerator}",
            *_cli_args(spec.args),
            f"--trainer.default_root_dir={folder}",
            "--trainer.callbacks+=lit_cf.studies.resumable_fit.EpochCheckpoint",
            f"--trainer.callbacks.path={ckpt}",
            *([f"--ckpt_path={ckpt}"] if resume else []),
        ]
        _run_cli(argv)
        if not ckpt.is_file():
            raise UserError(f"fit of {spec.name} wrote no checkpoint {ckpt}")
        seconds = round(time.time() - t0, 1)
        _write_json(
            marker, {"key": key, "name": spec.name, "configs": list(spec.configs), "args": dict(spec.args), "seconds": seconds}
        )
        self.models[spec.name] = {"key": key, "checkpoint": str(ckpt), "reused": False, "seconds": seconds}
        self.timings[f"fit_{spec.name}_s"] = seconds
        return ckpt

    def _finished_elsewhere(self, key: str) -> Path | None:
        """The folder of a finished fit with ``key`` in one of ``models_from`` (first found), or None."""
        for root in self.models_from:
            for cand in sorted((root / "models").glob(f"*-{key}")):
                if _finished_fit(cand, key) is not None:
                    return cand
        return None

    # ------------------------------------------------------------------ explain
    def explain(self, name: str, configs: Sequence[str], args: Mapping[str, Any]) -> Path:
        """``lit-cf explain`` in-process into ``<out>/explain/<name>/``; returns the run directory.

        ``configs``: data and method configs; ``args``: dotted overrides and explain's own
        arguments (``classifier``, ``num_queries``, ``model.init_args.steps``, ...). Explain
        resumes an interrupted run and leaves a finished one alone.
        """
        run = self.out / "explain" / name
        self.log(f"study: explain {name} -> {run}")
        t0 = time.time()
        argv = [
            "explain",
            *(f"--config={resolve_config(c)}" for c in configs),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.accelerator={self.accelerator}",
            f"--trainer.default_root_dir={self.out / 'explain'}",
            *_cli_args(args),
            f"--output_dir={run}",
        ]
        _run_cli(argv)
        self.explains[name] = str(run)
        self.timings[f"explain_{name}_s"] = round(time.time() - t0, 1)
        return run

    # ------------------------------------------------------------------ evaluate
    def evaluate(
        self, name: str, runs: Mapping[str, Path], args: Mapping[str, Any], configs: Sequence[str] = ()
    ) -> dict[str, Any]:
        """``lit-cf evaluate`` in-process into ``<out>/evaluate/<name>/``; returns ``metrics.json``.

        ``runs``: display name -> run directory; ``args``: evaluate's arguments (``oracles``,
        ``duq``, ``reference``, ...); ``configs``: the data config(s) the runs were explained on.
        An evaluation of the same inputs that already finished is reused.
        """
        folder = self.out / "evaluate" / name
        marker = self.out / "cache" / f"evaluate-{name}.json"
        key = _canonical(
            {
                "runs": {k: str(v) for k, v in runs.items()},
                "args": {k: _cli_value(v) for k, v in args.items()},
                "configs": [resolve_config(c).read_text() for c in configs],
            }
        )
        done = _read_json(marker)
        metrics_file = folder / "metrics.json"
        if isinstance(done, dict) and done.get("key") == key and metrics_file.is_file():
            self.log(f"study: evaluate {name}: reusing {folder}")
        else:
            self.log(f"study: evaluate {name} -> {folder}")
            t0 = time.time()
            argv = [
                "evaluate",
                *(f"--config={resolve_config(c)}" for c in configs),
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.accelerator={self.accelerator}",
                f"--trainer.default_root_dir={self.out / 'evaluate'}",
                f"--runs={json.dumps([str(p) for p in runs.values()])}",
                f"--names={json.dumps(list(runs))}",
                *_cli_args(args),
                f"--output_dir={folder}",
                f"--overwrite={'true' if folder.exists() else 'false'}",  # only ever our own earlier evaluation
            ]
            _run_cli(argv)
            _write_json(marker, {"key": key})
            self.timings[f"evaluate_{name}_s"] = round(time.time() - t0, 1)
        self.evaluations[name] = str(folder)
        return dict(json.loads(metrics_file.read_text()))

    # ------------------------------------------------------------------ cache
    def cached(self, name: str, key: Any, compute: Callable[[], T]) -> T:
        """``compute()`` (JSON-serialisable), stored at ``<out>/cache/<name>.json`` with ``key``.

        Recomputed only when the stored key differs. The value returned is always the stored
        JSON (tuples come back as lists), so a first run and a resumed one see the same thing.
        """
        path = self.out / "cache" / f"{name}.json"
        canon = _canonical(key)
        stored = _read_json(path)
        if isinstance(stored, dict) and stored.get("key") == canon and "value" in stored:
            return cast(T, stored["value"])  # the JSON of an earlier compute()
        value = compute()
        _write_json(path, {"key": canon, "value": value})
        return cast(T, json.loads(json.dumps(value, default=str)))  # the same as a reload


class Study(abc.ABC):
    """An experiment run by ``lit-cf study``; subclasses are registered with :func:`register_study`.

    A subclass's ``__init__`` takes its settings as typed keyword arguments with defaults (they
    are validated against the signature and listed by ``lit-cf study --config FILE --help``)
    and raises :class:`~lit_cf.errors.UserError` for combinations it refuses.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def run(self, ctx: StudyContext) -> StudyResult:
        """Train, explain, evaluate and judge with ``ctx``; return the results."""


#: registered studies by name (filled by :func:`register_study`; abstract classes are never in it)
study_registry: dict[str, type[Study]] = {}

S = TypeVar("S", bound=type[Study])


def register_study(cls: S) -> S:
    """Class decorator: make a concrete :class:`Study` runnable as ``study: <cls.name>``."""
    if inspect.isabstract(cls) or not isinstance(cls.__dict__.get("name"), str):
        raise TypeError(f"{cls.__name__}: only a concrete Study with its own `name` can be registered")
    other = study_registry.get(cls.name)
    if other is not None and other is not cls:
        raise TypeError(f"study name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    study_registry[cls.name] = cls
    return cls


# ---------------------------------------------------------------------- configs and settings
def _study_class(name: Any) -> type[Study]:
    if not isinstance(name, str) or name not in study_registry:
        raise UserError(f"unknown study {name!r}: the config's `study:` must be one of {sorted(study_registry)}")
    return study_registry[name]


def _settings_parser(cls: type[Study]) -> Any:
    from jsonargparse import ArgumentParser

    # allow_abbrev off: a misspelt setting (--settings.epoch) must not silently set another one
    parser = ArgumentParser(
        prog=f"lit-cf study ({cls.name})",
        exit_on_error=False,
        allow_abbrev=False,
        description=(cls.__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--config", required=False, help="the study config (YAML: study, output_dir, settings)")
    parser.add_argument("--output_dir", type=str | None, default=None, help="output folder (overrides the config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace this folder's earlier study output")
    parser.add_argument(
        "--models_from",
        type=list[str],
        default=[],
        help="other studies' output folders: their finished models of the same config are copied, not trained",
    )
    parser.add_class_arguments(cls, "settings")
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def validate_settings(cls: type[Study], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` checked against ``cls.__init__`` (names and types), defaults filled in."""
    from jsonargparse import ArgumentError

    if settings is not None and not isinstance(settings, Mapping):
        raise UserError(f"`settings` of study {cls.name} must be a mapping of setting: value")
    parser = _settings_parser(cls)
    try:
        ns = parser.parse_object({"settings": dict(settings or {})})
    except ArgumentError as err:
        raise UserError(f"invalid settings for study {cls.name}: {_one_line(err)}") from err
    return dict(ns.settings.as_dict())


def _load_config(config: Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        data: Any = dict(config)
    else:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise UserError(f"study config {path} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"study config {path} is not valid YAML: {_one_line(err)}") from err
    if not isinstance(data, dict):
        raise UserError("a study config is a mapping with `study`, `output_dir` and `settings`")
    unknown = sorted(set(data) - {"study", "output_dir", "settings", "description"})
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in the study config: use study, output_dir, settings, description")
    return data


# ---------------------------------------------------------------------- output folder
def _same_settings(stored: Any, settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """``stored`` (a folder's ``study.json`` settings) equals ``settings``, where a setting the
    study gained after the folder was made counts as equal at its default value (so a folder made
    by an earlier lit-cf still resumes)."""
    if not isinstance(stored, Mapping) or set(stored) - set(settings):
        return False
    for key, value in settings.items():
        before = stored[key] if key in stored else defaults.get(key, object())
        if _canonical(before) != _canonical(value):
            return False
    return True


def _prepare_out(
    out: Path, study: str, settings: dict[str, Any], overwrite: bool, defaults: Mapping[str, Any] | None = None
) -> None:
    """Make ``out`` ready: new, empty, the same study and settings (resume), or replaced with ``overwrite``.

    ``defaults``: the study's default settings (a setting missing from an older ``study.json``
    matches its default)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder: choose another output_dir")
    if not out.exists() or not any(out.iterdir()):
        return
    meta = _read_json(out / STUDY_FILE)
    if not isinstance(meta, dict) or "study" not in meta:
        raise UserError(
            f"output_dir {out} is not empty and holds no lit-cf study (no valid {STUDY_FILE}): choose a new output_dir"
        )
    same = meta.get("study") == study and _same_settings(meta.get("settings"), settings, defaults or {})
    if same:
        return  # resume: finished models, runs, evaluations and cached steps are reused
    if not overwrite:
        what = "settings" if meta.get("study") == study else f"study ({meta.get('study')})"
        raise UserError(
            f"output_dir {out} holds a run of this study with other {what}: "
            "choose a new output_dir or pass --overwrite (trained models of the same config are kept and reused)"
            if meta.get("study") == study
            else f"output_dir {out} holds another {what}: choose a new output_dir or pass --overwrite"
        )
    keep_models = meta.get("study") == study  # keyed by their config: still valid for the new settings
    for name in OWNED:
        if name == "models" and keep_models:
            continue
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


# ---------------------------------------------------------------------- results
def _fmt_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``rows`` (columns: the keys of the first row, in order)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _verdict_lines(result: StudyResult) -> list[str]:
    if result.passed is None:
        return []
    why = (result.verdict or {}).get("why")
    return [f"verdict: {'PASS' if result.passed else 'FAIL'}" + (f" ({why})" if why else "")]


def _results_md(study: str, out: Path, settings: dict[str, Any], result: StudyResult, seconds: float) -> str:
    import lit_cf

    parts = [
        f"# Study `{study}`",
        "",
        f"lit-cf {lit_cf.__version__}, {seconds:.0f} s, output `{out}`.",
        "",
        "Settings: " + ", ".join(f"`{k}={_cli_value(v)}`" for k, v in settings.items()),
        "",
        format_table(result.rows),
        "",
    ]
    parts += [f"- {line}" for line in result.notes]
    parts += ["", *_verdict_lines(result)]
    if result.report is not None:
        parts += ["", f"Report: `{result.report}`"]
    return "\n".join(parts).rstrip() + "\n"


def run_study(
    config: Path | Mapping[str, Any],
    output_dir: Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    models_from: Sequence[Path | str] = (),
) -> StudyResult:
    """Run the study of ``config`` (a study config file or its mapping) and write its results.

    ``output_dir`` overrides the config's. ``models_from``: other studies' output folders whose
    finished models of the same key are copied instead of trained (:meth:`StudyContext.fit`).
    Writes ``<out>/results.json`` (study, settings, model keys, rows, verdict, seconds, seed,
    lit-cf version) and ``<out>/results.md``. Running the
    same study and settings again resumes (everything finished is reused); another study or
    other settings in a non-empty folder is refused unless ``overwrite``.
    """
    import lit_cf
    from lit_cf.utils.boundary import CreatedPaths, user_message

    data = _load_config(config)
    cls = _study_class(data.get("study"))
    settings = validate_settings(cls, data.get("settings"))
    out_value = output_dir if output_dir is not None else data.get("output_dir")
    if out_value is None or not str(out_value).strip():
        raise UserError("no output folder: set `output_dir` in the study config or pass --output_dir")
    out = Path(out_value)
    sources = [Path(p).expanduser() for p in models_from]
    for src in sources:
        if not (src / "models").is_dir():
            raise UserError(f"models_from: {src} holds no models/ folder of a lit-cf study: name a study's output_dir")
        if src.resolve() == out.resolve():
            raise UserError(f"models_from: {src} is this study's own output_dir")
    study = cls(**settings)  # refuses bad combinations before anything is written
    _prepare_out(out, cls.name, settings, overwrite, validate_settings(cls, {}))
    created = CreatedPaths()
    created.watch(out)
    log: Callable[[str], None] = (lambda line: None) if quiet else (lambda line: print(line, flush=True))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / STUDY_FILE, {"study": cls.name, "settings": settings})
        ctx = StudyContext(out, accelerator=str(settings.get("accelerator", "auto")), log=log, models_from=sources)
        t0 = time.time()
        result = study.run(ctx)
        seconds = round(time.time() - t0, 1)
        import torch

        summary = {
            "study": cls.name,
            "settings": settings,
            "seed": settings.get("seed"),
            "lit_cf_version": lit_cf.__version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "models": ctx.models,
            "explain_runs": ctx.explains,
            "evaluations": ctx.evaluations,
            "rows": result.rows,
            "verdict": result.verdict,
            "passed": result.passed,
            "report": str(result.report) if result.report else None,
            "notes": result.notes,
            "details": result.details,
            "seconds": seconds,
            "timings": ctx.timings,
        }
        _write_json(out / "results.json", summary)
        from lit_cf.runs.atomic import atomic_write_text

        atomic_write_text(out / "results.md", _results_md(cls.name, out, settings, result, seconds))
    except Exception as err:
        if user_message(err) is not None:
            created.remove_new()  # a new folder that failed on bad input: nothing left behind
        raise
    return result


# ---------------------------------------------------------------------- the `lit-cf study` verb
USAGE = "lit-cf study --config FILE [--output_dir DIR] [--settings.NAME VALUE ...] [--overwrite] [--models_from '[DIR, ...]']"


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError(f"--config needs a file; usage: {USAGE}")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def study_main(argv: Sequence[str]) -> int:
    """``lit-cf study ...``: parse, run, print the table, the verdict and the report; the exit status.

    0: done (PASS or no verdict), 1: verdict FAIL. Bad input raises
    :class:`~lit_cf.errors.UserError` (``lit-cf``'s error boundary prints one line, exit 2).
    """
    from jsonargparse import ArgumentError

    from lit_cf import studies  # noqa: F401  # registers the built-in studies

    argv = list(argv)
    path = _config_path(argv)
    if path is None:
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: {USAGE}\n\nstudies: {', '.join(sorted(study_registry))} (configs/study/*.yaml)")
            print("`lit-cf study --config FILE --help` lists that study's settings.")
            return 0
        raise UserError(f"lit-cf study needs --config FILE (e.g. configs/study/quickstart.yaml); usage: {USAGE}")
    data = _load_config(Path(path))
    cls = _study_class(data.get("study"))
    base = validate_settings(cls, data.get("settings"))
    parser = _settings_parser(cls)
    parser.set_defaults({f"settings.{k}": v for k, v in base.items()})
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as err:
        raise UserError(f"{_one_line(err)} (`lit-cf study --config {path} --help` lists the settings of {cls.name})") from err
    data["settings"] = dict(ns.settings.as_dict())
    output_dir = Path(ns.output_dir) if ns.output_dir else None
    result = run_study(data, output_dir=output_dir, overwrite=bool(ns.overwrite), models_from=list(ns.models_from or []))
    out = output_dir if output_dir is not None else Path(str(data.get("output_dir")))
    print()
    print(format_table(result.rows))
    for line in result.notes:
        print(line)
    for line in _verdict_lines(result):
        print(line)
    if result.report is not None:
        print(f"report: {result.report}")
    print(f"results: {out / 'results.md'} and {out / 'results.json'}")
    return 1 if result.passed is False else 0
