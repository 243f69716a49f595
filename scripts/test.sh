#!/usr/bin/env bash
# Install Needle with its test extras (torch==2.13.0 first: the CPU wheel) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
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
python3 -m pytest -q "$@"
