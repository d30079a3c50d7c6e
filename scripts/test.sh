#!/usr/bin/env bash
# Set up everything the tests use (venv, Debian servers) and run the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_test_deps.sh
exec .venv/bin/python -m pytest -q "$@"
