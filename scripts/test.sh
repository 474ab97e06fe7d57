#!/usr/bin/env bash
# Install lit-cf with its dev extra (torch/torchvision pinned as a matching pair by constraints.txt),
# run the static checks (ruff format check and lint over lit_cf/, tests/, scripts/; mypy over lit_cf/;
# settings in pyproject.toml), then the default test suite on two pytest-xdist workers (slow tests excluded; about 9 min on 2 CPU
# cores). A failed static check does not hide the test results: pytest still runs, and the script
# exits non-zero naming the checks that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"

failed=()
check() {
    echo "test.sh: $*"
    "$@" || failed+=("$*")
}
check python -m ruff format --check lit_cf tests scripts
check python -m ruff check lit_cf tests scripts
check python -m mypy

status=0
# two workers (pytest-xdist), each test file on one worker so its module fixtures are built once
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@" || status=$?
if ((${#failed[@]})); then
    printf 'test.sh: FAILED static check: %s\n' "${failed[@]}" >&2
    exit 1
fi
exit "$status"
