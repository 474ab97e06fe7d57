"""One error boundary for every verb: expected failures are one line, exit 2, no traceback, and
leave nothing behind; checkpoints never decide what is imported; user files are never replaced."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.utils.boundary import user_message
from tests.conftest import CONFIGS
from tests.fixtures import write_idx_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

RENDERED = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
]


def explain_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "explain", *RENDERED, f"--config={CONFIGS / 'explain/pixel.yaml'}", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--classifier={ckpt}",
        f"--output_dir={out}", "--num_queries=4", "--model.init_args.steps=2", *extra,
    ]  # fmt: skip


def fit_args(logs: Path, *extra: str, data: list[str] | None = None) -> list[str]:
    return [
        "fit", *(RENDERED if data is None else data), f"--config={CONFIGS / 'model/cnn.yaml'}",
        f"--config={CONFIGS / 'logger/csv.yaml'}", f"--trainer.default_root_dir={logs}",
        f"--trainer.logger.init_args.save_dir={logs}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--sample_grid.num_samples=0", *extra,
    ]  # fmt: skip


def expect_error(args: list[str], capsys, match: str) -> str:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("lit-cf: error:")]
    assert len(lines) == 1, captured.err[-2000:]
    assert match in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- user files
def test_a_users_folder_is_never_written_into(cnn_ckpt, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "grids").mkdir(parents=True)
    (folder / "grids" / "grid-000.png").write_bytes(b"my picture")
    (folder / "config.yaml").write_text("my: config\n")
    for extra in ([], ["--overwrite=true"]):
        expect_error(explain_args(cnn_ckpt, folder, *extra), capsys, "holds no lit-cf explain run")
        assert (folder / "config.yaml").read_text() == "my: config\n"
        assert (folder / "grids" / "grid-000.png").read_bytes() == b"my picture"
        assert sorted(p.name for p in folder.rglob("*")) == ["config.yaml", "grid-000.png", "grids"]


def test_empty_output_dir_is_refused(cnn_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a if not a.startswith("--output_dir=") else "--output_dir=" for a in explain_args(cnn_ckpt, Path("x"))]
    expect_error(args, capsys, "output_dir is empty")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints
def _ckpt_with(cnn_ckpt: Path, path: Path, edit) -> Path:
    ckpt = torch.load(cnn_ckpt, weights_only=True)
    edit(ckpt["hyper_parameters"])
    torch.save(ckpt, path)
    return path


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module in the working directory that writes a file when imported."""
    marker = tmp_path / "pwned"
    (tmp_path / "evil_backbone.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nimport torch\nclass Backbone(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evil_backbone", None)


@pytest.mark.parametrize("target", ["evil_backbone.Backbone", "this.Zen"])
def test_nested_class_path_from_a_checkpoint_is_never_imported(cnn_ckpt, tmp_path, capsys, evil_module, target):
    def edit(h):
        h["backbone"]["class_path"] = target

    ckpt = _ckpt_with(cnn_ckpt, tmp_path / "bad.ckpt", edit)
    sys.modules.pop("this", None)
    expect_error(explain_args(ckpt, tmp_path / "run"), capsys, target)
    logs = tmp_path / "logs"
    expect_error(fit_args(logs, f"--ckpt_path={ckpt}"), capsys, target)
    expect_error(["test", *fit_args(logs, f"--ckpt_path={ckpt}")[1:]], capsys, target)
    assert not evil_module.exists(), "the module in the working directory ran"
    assert "evil_backbone" not in sys.modules and "this" not in sys.modules
    assert "Beautiful is better" not in capsys.readouterr().out
    assert not (tmp_path / "run").exists() and not logs.exists()


def test_top_level_class_path_outside_lit_cf_is_refused(cnn_ckpt, tmp_path, capsys, evil_module):
    def edit(h):
        h["_class_path"] = "evil_backbone.Backbone"

    ckpt = _ckpt_with(cnn_ckpt, tmp_path / "bad.ckpt", edit)
    expect_error(explain_args(ckpt, tmp_path / "run"), capsys, "evil_backbone")
    assert not evil_module.exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo unsafe > pwned_by_pickle",))


def test_fit_and_test_ckpt_path_load_safely(cnn_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    malicious = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Evil()}, malicious)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(cnn_ckpt.read_bytes()[:2000])
    for verb in ("fit", "test"):
        base = fit_args(logs)
        base[0] = verb
        expect_error(base + [f"--ckpt_path={tmp_path / 'missing.ckpt'}"], capsys, "checkpoint not found")
        expect_error(base + [f"--ckpt_path={corrupt}"], capsys, "corrupt")
        expect_error(base + [f"--ckpt_path={malicious}"], capsys, "not a weights-only")
    assert not (tmp_path / "pwned_by_pickle").exists()
    assert not logs.exists()


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--num_queries=-2", "--select=correct"], "num_queries must be >= 1"),
        (["--num_grid_images=-1"], "num_grid_images must be >= 0"),
        (["--chunk_size=0"], "chunk_size must be >= 1"),
        (["--source_class=99"], "source_class 99 is out of range"),
        (["--model.init_args.steps=0"], "steps must be >= 1"),
        (["--model.init_args.lr=-0.5"], "lr must be > 0"),
    ],
)
def test_explain_numbers_are_checked(cnn_ckpt, tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    expect_error(explain_args(cnn_ckpt, out, *extra), capsys, match)
    assert not out.exists()


@pytest.mark.parametrize(
    "content,match",
    [("[3, 4, 5]", "JSON list, not an object"), ("null", "JSON NoneType"), ('{"0": [[1]]}', "is not a class index"),
     ('{"0": null}', "is not a class index"), ('{"0": true}', "is not a class index"), ("{", "cannot parse")],
)  # fmt: skip
def test_bad_target_files(cnn_ckpt, tmp_path, capsys, content, match):
    target_file = tmp_path / "targets.json"
    target_file.write_text(content)
    out = tmp_path / "run"
    expect_error(explain_args(cnn_ckpt, out, "--target=file", f"--target_file={target_file}"), capsys, match)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--trainer.max_epochs=-5"], "max_epochs must be an integer >= -1"),
        (["--data.init_args.batch_size=0"], "batch_size must be >= 1"),
        (["--trainer.limit_train_batches=-1"], "limit_train_batches"),
        (["--model.init_args.num_classes=3"], "num_classes=3"),
    ],
)
def test_fit_numbers_are_checked_before_any_folder(tmp_path, capsys, extra, match):
    logs = tmp_path / "runs"
    expect_error(fit_args(logs, *extra), capsys, match)
    assert not logs.exists(), "a failed fit must leave no run folder behind"


def test_a_fit_failing_midway_removes_its_log_folder(tmp_path, capsys, monkeypatch):
    from lit_cf.data.base import ImageDataModule

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device", "/data")

    monkeypatch.setattr(ImageDataModule, "val_dataloader", full_disk)
    logs = tmp_path / "runs"
    expect_error(fit_args(logs), capsys, "no space left on device")
    assert not logs.exists()


def test_evaluate_numbers_and_output_dir(tmp_path, capsys):
    base = ["evaluate", *RENDERED, "--trainer.logger=false", f"--runs=[{tmp_path / 'none'}]"]
    expect_error(base + [f"--output_dir={tmp_path / 'e'}", "--batch_size=0"], capsys, "batch_size must be")
    expect_error(base + [f"--output_dir={tmp_path / 'e'}", "--cout_steps=0"], capsys, "cout_steps must be")
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    expect_error(base + [f"--output_dir={blocker}"], capsys, "not a directory")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine")
    expect_error(base + [f"--output_dir={folder}", "--overwrite=true"], capsys, "holds no lit-cf evaluation")
    assert blocker.read_text() == "mine" and (folder / "config.yaml").read_text() == "mine"


# ----------------------------------------------------------------------------- data
def test_missing_celeba_root(cnn_ckpt, tmp_path, capsys):
    args = explain_args(cnn_ckpt, tmp_path / "run")
    args[1:5] = ["--data=lit_cf.data.celeba.CelebADataModule", f"--data.init_args.root={tmp_path / 'nowhere'}"]
    expect_error(args, capsys, "CelebA folder not found")


def test_missing_mnist_root_with_download_leaves_nothing(cnn_ckpt, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(self):  # what torchvision does offline: create the folder, then fail
        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error no network>")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    root = tmp_path / "root"
    root.mkdir()
    args = explain_args(cnn_ckpt, tmp_path / "run")
    args[1:5] = ["--data=lit_cf.data.MNISTDataModule", f"--data.init_args.root={root}", "--data.init_args.download=true"]
    expect_error(args, capsys, "MNIST data not found")
    assert list(root.iterdir()) == [], "the failed download left folders behind"


@pytest.mark.parametrize("damage", ["gz", "idx"])
def test_damaged_mnist_files_are_one_error_and_leave_no_run_folder(tmp_path, capsys, damage):
    root = write_idx_dataset(tmp_path / "data", n_train=32, n_test=16, gz=damage == "gz")
    raw = root / "MNIST" / "raw"
    if damage == "gz":
        path = raw / "train-images-idx3-ubyte.gz"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        match = "could not unpack"
    else:
        (raw / "train-images-idx3-ubyte").write_bytes(b"not an IDX file" * 20)
        match = "damaged or not IDX files"
    logs = tmp_path / "runs"
    data_args = ["--data=lit_cf.data.MNISTDataModule", f"--data.init_args.root={root}", "--data.init_args.val_size=4"]
    expect_error(fit_args(logs, data=data_args), capsys, match)
    assert not logs.exists()
    assert not [p for p in raw.iterdir() if p.name.startswith(".")], "no temporary file is left"


# ----------------------------------------------------------------------------- debug
def test_debug_flag_and_env_show_the_traceback(cnn_ckpt, tmp_path, capsys, monkeypatch):
    args = explain_args(cnn_ckpt, tmp_path / "run", "--num_grid_images=-1")
    with pytest.raises(SystemExit):
        main(args + ["--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and "lit-cf: error: num_grid_images" in err
    monkeypatch.setenv("LIT_CF_DEBUG", "1")
    with pytest.raises(SystemExit):
        main(args)
    assert "Traceback" in capsys.readouterr().err


def test_user_message_maps_expected_failures():
    from safetensors import SafetensorError

    assert "no space left" in user_message(
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    )
    assert "permission denied (/x)" in user_message(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert "is a file, not a directory" in user_message(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"))
    assert "invalid JSON" in user_message(json.JSONDecodeError("Expecting value", "x", 0))
    assert user_message(KeyError("a bug")) is None and user_message(RuntimeError("a bug")) is None


def test_a_valid_ckpt_path_still_loads_for_test_and_fit(cnn_ckpt, tmp_path):
    logs = tmp_path / "logs"
    base = fit_args(logs)
    main(["test", *base[1:], f"--ckpt_path={cnn_ckpt}"])
    main([*base, "--trainer.max_epochs=4", f"--ckpt_path={cnn_ckpt}"])  # resumes after its 3 epochs
    assert list(logs.rglob("*.ckpt"))
