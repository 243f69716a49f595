#!/usr/bin/env bash
# Install Needle, pinned to the tested set (constraints.txt; torch==2.13.0 first: the CPU
# wheel), and run the demo: serve the dashboard at http://127.0.0.1:8000 at once, while a worker
# thread beside the server indexes the bundled model into the embedded SQLite database.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e .
exec needle demo "$@"
