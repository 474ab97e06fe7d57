"""CI wiring: the README's test command runs the static checks before pytest, the package ships its
py.typed marker, and .ci/run installs Chromium for the browser test (or fails clearly)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands(script: Path) -> list[list[str]]:
    """The top-level commands of a shell script, one token list a command (comments, `set`, `cd` and
    shell-function bodies dropped; a `check CMD` line counts as CMD)."""
    commands = []
    for line in script.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith((" ", "\t", "#", "}")):
            continue
        tokens = shlex.split(line, comments=True)
        if tokens and tokens[0] == "check":
            tokens = tokens[1:]
        if tokens and tokens[0] not in ("set", "cd", "failed=()", "status=0", "if", "fi", "exit") and "()" not in tokens[0]:
            commands.append(tokens)
    return commands


def test_test_script_runs_static_checks_before_pytest():
    commands = _commands(ROOT / "scripts" / "test.sh")
    assert [c[:4] for c in commands] == [
        ["python", "-m", "pip", "install"],
        ["python", "-m", "ruff", "format"],
        ["python", "-m", "ruff", "check"],
        ["python", "-m", "mypy"],
        ["python", "-m", "pytest", "-q"],
    ]  # install, format check, lint, types, tests: each once, in this order
    install, fmt, lint, mypy, _ = commands
    assert "constraints.txt" in install and ".[dev]" in install
    assert fmt[3:] == ["format", "--check", "lit_cf", "tests", "scripts"]
    assert lint[3:] == ["check", "lit_cf", "tests", "scripts"]
    assert mypy == ["python", "-m", "mypy"]  # files and strictness come from pyproject


def _fake_test_script(tmp_path: Path, failing: str | None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run a copy of scripts/test.sh with `python` replaced by a stub that logs its arguments and
    fails when they contain ``failing``."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    log = tmp_path / "calls.log"
    fail = f'case "$*" in *"{failing}"*) exit 3;; esac' if failing else ""
    (bin_dir / "python").write_text(f'#!/bin/bash\necho "$*" >> {log}\n{fail}\n')
    (bin_dir / "python").chmod(0o755)
    for tool in ("bash", "dirname"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    done = subprocess.run(
        ["bash", str(repo / "scripts" / "test.sh"), "-k", "x"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
        timeout=30,
    )
    return done, log.read_text().splitlines()


def test_test_script_passes_when_every_step_passes(tmp_path):
    done, calls = _fake_test_script(tmp_path, failing=None)
    assert done.returncode == 0, done.stderr
    assert [c.split()[1:3] for c in calls] == [
        ["pip", "install"],
        ["ruff", "format"],
        ["ruff", "check"],
        ["mypy"],
        ["pytest", "-q"],
    ]
    assert calls[-1].endswith("-k x")  # the script's arguments go to pytest


@pytest.mark.parametrize("failing", ["ruff format", "ruff check", "mypy"])
def test_a_failed_static_check_fails_the_run_but_pytest_still_runs(tmp_path, failing):
    done, calls = _fake_test_script(tmp_path, failing=failing)
    assert done.returncode == 1
    assert any(c.startswith("-m pytest") for c in calls)  # the test results are not hidden
    assert f"FAILED static check: python -m {failing}" in done.stderr


def test_test_script_returns_pytest_status(tmp_path):
    done, _ = _fake_test_script(tmp_path, failing="pytest")
    assert done.returncode == 3


def test_ci_runs_the_test_script():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[-1] == "bash scripts/test.sh"  # exactly the README's test command, last


def test_py_typed_is_packaged():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert (ROOT / "lit_cf" / "py.typed").is_file()
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["lit_cf"]
    assert config["tool"]["mypy"]["files"] == ["lit_cf"]
    dev = " ".join(config["project"]["optional-dependencies"]["dev"])
    assert "ruff" in dev and "mypy" in dev


def _fake_ci(tmp_path: Path, apt_get: str, apt_cache: str) -> subprocess.CompletedProcess[str]:
    """Run a copy of .ci/run in a fake checkout whose scripts/test.sh only reports it ran, with
    apt-get and apt-cache replaced by stubs and no chromium on PATH."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    (repo / "scripts").mkdir()
    bin_dir.mkdir(exist_ok=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "scripts" / "test.sh").write_text('echo "test.sh ran with CI=$CI"\n')
    log = tmp_path / "apt.log"
    for name, body in (("apt-get", apt_get), ("apt-cache", apt_cache)):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\necho "{name} $*" >> {log}\n{body}\n')
        stub.chmod(0o755)
    for tool in ("bash", "dirname", "chmod"):  # what the script needs besides the stubs
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=30)


def test_ci_installs_missing_chromium(tmp_path):
    chromium = tmp_path / "bin" / "chromium"
    installs = f'if [ "$1" = install ]; then printf "#!/bin/bash\\necho Chromium 1.0\\n" > {chromium}; chmod +x {chromium}; fi'
    done = _fake_ci(tmp_path, apt_get=installs, apt_cache="exit 100")  # package lists empty: update first
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "apt-cache show chromium",
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends chromium",
    ]
    assert "test.sh ran with CI=true" in done.stdout


def test_ci_fails_clearly_when_chromium_cannot_be_installed(tmp_path):
    done = _fake_ci(tmp_path, apt_get='if [ "$1" = install ]; then exit 100; fi', apt_cache="exit 0")  # no such package
    assert done.returncode == 1
    assert "could not install Chromium" in done.stderr
    assert "test.sh ran" not in done.stdout  # the tests never start
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "apt-cache show chromium",
        "apt-get install -y -qq --no-install-recommends chromium",
        "apt-get update -qq",  # stale lists? one update and one more try
        "apt-get install -y -qq --no-install-recommends chromium",
    ]


def test_ci_installs_without_update_when_the_lists_know_chromium(tmp_path):
    chromium = tmp_path / "bin" / "chromium"
    installs = f'if [ "$1" = install ]; then printf "#!/bin/bash\\necho Chromium 1.0\\n" > {chromium}; chmod +x {chromium}; fi'
    done = _fake_ci(tmp_path, apt_get=installs, apt_cache="exit 0")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "apt-cache show chromium",
        "apt-get install -y -qq --no-install-recommends chromium",
    ]
    assert "test.sh ran with CI=true" in done.stdout


def test_ci_skips_install_when_chromium_present(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/bash\necho Chromium 1.0\n")
    (bin_dir / "chromium").chmod(0o755)
    done = _fake_ci(tmp_path, apt_get="exit 1", apt_cache="exit 1")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "apt.log").exists()  # apt untouched
    assert "test.sh ran with CI=true" in done.stdout
