#!/usr/bin/env bash
# Install lit-cf with its dev extra (torch/torchvision pinned as a matching pair by constraints.txt),
# run the static checks (ruff format check, ruff lint, mypy over lit_cf/; config in pyproject.toml),
# then the default test suite (slow tests excluded; about 10 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
echo "test.sh: ruff format --check" && python -m ruff format --check lit_cf tests scripts
echo "test.sh: ruff check" && python -m ruff check lit_cf tests scripts
echo "test.sh: mypy" && python -m mypy
python -m pytest -q -p no:cacheprovider "$@"
