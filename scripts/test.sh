#!/usr/bin/env bash
# Install Needle with its test extras, pinned to the tested set (constraints.txt; torch==2.13.0
# first: the CPU wheel), then lint (ruff), type-check (mypy) and run the tests. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
# The real-browser tests (tests/test_browser.py) drive Debian's chromium through Playwright;
# install it when missing (never `playwright install`, which downloads a browser of its own).
CHROMIUM="${NEEDLE_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  why=""
  if [ "$(id -u)" = 0 ]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo -n); else why="not root, and no passwordless sudo"; fi
  command -v apt-get >/dev/null 2>&1 || why="there is no apt-get"
  apt() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@"; }
  if [ -z "$why" ]; then
    echo "chromium is not at $CHROMIUM: installing Debian's chromium with apt-get" >&2
    apt install chromium || { apt update && apt install chromium; } || why="apt-get install chromium failed (above)"
  fi
  if [ -n "$why" ] || [ ! -x "$CHROMIUM" ]; then
    echo "chromium is not at $CHROMIUM and could not be installed: ${why:-apt-get put it elsewhere}." \
      "The browser tests will skip (with NEEDLE_REQUIRE_BROWSER=1, as in CI, they fail)." >&2
  fi
fi
# Lint and types first, then the tests whatever they said: one run shows every kind of failure.
checks=0
echo "ruff check ." >&2
python3 -m ruff check . || checks=1
echo "mypy (app, needle, workers: pyproject.toml [tool.mypy])" >&2
python3 -m mypy || checks=1
tests=0
python3 -m pytest -q "$@" || tests=$?
if [ "$checks" != 0 ]; then
  echo "ruff or mypy found problems (above)." >&2
  [ "$tests" != 0 ] || tests=1
fi
exit "$tests"
