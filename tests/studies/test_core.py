"""lit_cf.studies core: reuse of trained models, resume, output-folder rules, `lit-cf study` errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.studies import ModelSpec, Study, StudyContext, StudyResult, register_study, run_study, study_registry

TINY = {
    "data.init_args.train_size": 128,
    "data.init_args.val_size": 32,
    "data.init_args.test_size": 64,
    "data.init_args.batch_size": 64,
}


@register_study
class TinyCoreStudy(Study):
    """A tiny study for the tests: one small CNN, a pixel explain run, a cached step."""

    name = "tiny_core_test"

    def __init__(self, epochs: int = 1, queries: int = 3, label: str = "a") -> None:  # label: a setting that changes nothing
        if queries < 1:
            raise UserError("queries must be >= 1")
        self.epochs, self.queries, self.label = epochs, queries, label

    def run(self, ctx: StudyContext) -> StudyResult:
        spec = ModelSpec(
            "cnn",
            ("data/rendered.yaml", "model/cnn.yaml"),
            {**TINY, "trainer.max_epochs": self.epochs, "trainer.limit_train_batches": 2, "seed_everything": 0},
        )
        ckpt = ctx.fit(spec)
        run = ctx.explain(
            "pixel",
            ("data/rendered.yaml", "explain/pixel.yaml"),
            {"data.init_args.test_size": 64, "classifier": ckpt, "num_queries": self.queries, "model.init_args.steps": 2},
        )
        calls = []
        n = ctx.cached("count", {"queries": self.queries}, lambda: calls.append(1) or len(list((run / "shards").glob("*"))))
        rows = [{"model": "cnn", "queries": self.queries, "label": self.label, "fresh": bool(calls), "shards": n}]
        return StudyResult(rows=rows, verdict={"pass": True, "why": "test"}, passed=True)


@register_study
class VerdictOnlyStudy(Study):
    """No model: a cached step and a verdict (the exit status of `lit-cf study`)."""

    name = "verdict_only_test"

    def __init__(self, passed: bool = True) -> None:
        self.passed = passed

    def run(self, ctx: StudyContext) -> StudyResult:
        value = ctx.cached("value", {"passed": self.passed}, lambda: {"x": [1, 2]})
        why = "it said so" if self.passed else "it said no"
        return StudyResult(rows=[{"x": value["x"][1]}], verdict={"pass": self.passed, "why": why}, passed=self.passed)


def config(tmp_path: Path, study: str = "tiny_core_test", **settings) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"study": study, "output_dir": str(tmp_path / "out"), "settings": settings}))
    return path


def ckpts(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("models/*/last.ckpt")}


def test_registry_holds_concrete_studies_by_name():
    assert study_registry["tiny_core_test"] is TinyCoreStudy
    with pytest.raises(TypeError):
        register_study(Study)  # abstract: never registered
    with pytest.raises(TypeError, match="taken"):

        @register_study
        class Other(TinyCoreStudy):  # same name, another class
            name = "tiny_core_test"


def test_study_writes_results_reuses_models_and_resumes(tmp_path, capsys):
    cfg = config(tmp_path)
    out = tmp_path / "out"
    main(["study", "--config", str(cfg)])
    printed = capsys.readouterr().out
    assert "verdict: PASS" in printed and "results.md" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == "tiny_core_test" and results["settings"] == {"epochs": 1, "queries": 3, "label": "a"}
    assert results["rows"][0]["fresh"] is True and results["passed"] is True
    assert results["models"]["cnn"]["reused"] is False and len(results["models"]["cnn"]["key"]) == 12
    assert "| cnn | 3 | a |" in (out / "results.md").read_text()
    first = ckpts(out)
    assert len(first) == 1

    # the same command again: the model, the explain run and the cached step are reused
    main(["study", "--config", str(cfg)])
    again = json.loads((out / "results.json").read_text())
    assert ckpts(out) == first
    assert again["models"]["cnn"]["reused"] is True and again["rows"][0]["fresh"] is False

    # other settings in the same folder: refused, nothing changed
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", str(cfg), "--settings.epochs", "2"])
    assert err.value.code == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["settings"]["epochs"] == 1

    # a folder made before the study gained a setting resumes while that setting is at its default
    meta = json.loads((out / "study.json").read_text())
    del meta["settings"]["label"]
    (out / "study.json").write_text(json.dumps(meta))
    main(["study", "--config", str(cfg)])
    assert json.loads((out / "results.json").read_text())["models"]["cnn"]["reused"] is True
    assert json.loads((out / "study.json").read_text())["settings"]["label"] == "a"
    (out / "study.json").write_text(json.dumps(meta))  # without "label" again
    with pytest.raises(SystemExit) as err:  # ... but not at another value
        main(["study", "--config", str(cfg), "--settings.label", "b"])
    assert "other settings" in capsys.readouterr().err
    (out / "study.json").write_text(json.dumps({**meta, "settings": {**meta["settings"], "label": "a"}}))

    # --overwrite: a changed model setting trains a new model (new key); the old one is kept
    main(["study", "--config", str(cfg), "--settings.epochs", "2", "--overwrite"])
    now = ckpts(out)
    assert len(now) == 2 and set(first) < set(now)
    assert now[next(iter(first))] == first[next(iter(first))]
    # a setting that changes only the study's own step: the model is reused, the cache recomputed
    main(["study", "--config", str(cfg), "--settings.epochs", "2", "--settings.queries", "4", "--overwrite"])
    last = json.loads((out / "results.json").read_text())
    assert last["models"]["cnn"]["reused"] is True and last["rows"][0]["fresh"] is True
    assert ckpts(out) == now


def test_models_from_copies_a_finished_fit_of_the_same_key_under_any_name(tmp_path, capsys):
    first = tmp_path / "first"
    main(["study", "--config", str(config(tmp_path)), "--output_dir", str(first)])
    (trained,) = (first / "models").glob("cnn-*")
    src = trained.rename(trained.with_name(trained.name.replace("cnn-", "classifier-")))  # another study's name: the key decides
    second = tmp_path / "second"
    main(["study", "--config", str(config(tmp_path)), "--output_dir", str(second), "--models_from", f"[{first}]"])
    assert "copied the finished fit" in capsys.readouterr().out
    results = json.loads((second / "results.json").read_text())
    assert results["models"]["cnn"]["reused"] is True and results["models"]["cnn"]["copied_from"] == str(src)
    (copy,) = (second / "models").glob("cnn-*")
    assert (copy / "last.ckpt").read_bytes() == (src / "last.ckpt").read_bytes() and (copy / "fit.json").is_file()
    # another key (2 epochs) is not copied: trained here
    third = tmp_path / "third"
    main(["study", "--config", str(config(tmp_path, epochs=2)), "--output_dir", str(third), "--models_from", f"[{first}]"])
    assert json.loads((third / "results.json").read_text())["models"]["cnn"]["reused"] is False
    with pytest.raises(UserError, match="this study's own output_dir"):
        run_study(config(tmp_path), output_dir=first, models_from=[first])


def test_an_interrupted_fit_continues_from_its_last_whole_epoch(tmp_path):
    import torch

    def spec(epochs: int) -> ModelSpec:
        args = {**TINY, "trainer.max_epochs": epochs, "trainer.limit_train_batches": 2, "seed_everything": 0}
        return ModelSpec("cnn", ("data/rendered.yaml", "model/cnn.yaml"), args)

    lines: list[str] = []
    ctx = StudyContext(tmp_path / "out", accelerator="cpu", log=lines.append)
    one = ctx.fit(spec(1))
    assert torch.load(one, weights_only=True)["global_step"] == 2 and not list(one.parent.glob(".*"))
    # a 3-epoch fit killed after its first epoch: its folder holds that epoch's last.ckpt, no fit.json
    folder = tmp_path / "out" / "models" / f"cnn-{spec(3).key()}"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(one.read_bytes())
    three = ctx.fit(spec(3))
    assert lines[-1].endswith(f"(resuming from {three})")
    assert torch.load(three, weights_only=True)["global_step"] == 6 and (folder / "fit.json").is_file()
    # interrupted before any checkpoint, or with a truncated one: started over
    empty = tmp_path / "out" / "models" / f"cnn-{spec(2).key()}"
    empty.mkdir()
    (empty / "stray.txt").write_text("x")
    (empty / "last.ckpt").write_bytes(one.read_bytes()[:1000])
    two = ctx.fit(spec(2))
    assert not lines[-1].endswith(")") and lines[-1].endswith(str(empty))
    assert torch.load(two, weights_only=True)["global_step"] == 4 and not (empty / "stray.txt").exists()


def test_failed_verdict_exits_1_and_a_pass_returns(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", str(config(tmp_path, "verdict_only_test", passed=False))])
    assert err.value.code == 1
    assert "verdict: FAIL (it said no)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["passed"] is False
    main(["study", "--config", str(config(tmp_path, "verdict_only_test")), "--output_dir", str(tmp_path / "ok")])
    assert "verdict: PASS (it said so)" in capsys.readouterr().out
    assert "| x |" in (tmp_path / "ok" / "results.md").read_text()


def test_folder_of_another_kind_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds no lit-cf study"):
            run_study(config(tmp_path), overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_another_study_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"study": "other", "settings": {}}))
    (out / "mine.txt").write_text("kept")
    with pytest.raises(UserError, match="another study"):
        run_study(config(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "study.json"]


@pytest.mark.parametrize(
    "doc,args,message",
    [
        ({"study": "no_such_study"}, [], "unknown study 'no_such_study'"),
        ({"study": "tiny_core_test", "settings": {"epochs": "many"}}, [], "settings.epochs"),
        ({"study": "tiny_core_test"}, ["--settings.nope", "1"], "unrecognized arguments: --settings.nope"),
        ({"study": "tiny_core_test"}, ["--settings.queries", "two"], "settings.queries"),
        ({"study": "tiny_core_test"}, ["--settings.quer", "2"], "unrecognized arguments: --settings.quer"),  # no prefix matching
        ({"study": "tiny_core_test"}, ["--settings.queries", "0"], "queries must be >= 1"),
        ({"study": "tiny_core_test", "extra": 1}, [], "unknown key(s) ['extra']"),
        ({"study": "tiny_core_test", "output_dir": None}, [], "no output folder"),
        ({"study": "tiny_core_test"}, ["--models_from", "[/no/such/study]"], "models_from: /no/such/study holds no models/"),
    ],
)
def test_usage_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, doc, args, message):
    out = tmp_path / "out"
    doc = {"output_dir": str(out), **doc}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", str(cfg), *args])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lit-cf: error: ") and message in lines[0]
    assert not out.exists()


def test_missing_config_is_a_usage_error(tmp_path, capsys):
    for argv in (["study"], ["study", "--config", str(tmp_path / "absent.yaml")]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert capsys.readouterr().err.startswith("lit-cf: error: ")
