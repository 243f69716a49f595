#!/usr/bin/env bash
# Install Needle with its test extras (torch==2.13.0 first: the CPU wheel) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m pytest -q "$@"
