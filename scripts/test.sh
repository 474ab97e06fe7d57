#!/usr/bin/env bash
# Install lit-cf with its test extra (torch/torchvision pinned as a matching pair by
# constraints.txt) and run the default test suite (slow tests excluded; about 10 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
python -m pytest -q -p no:cacheprovider "$@"
