"""The web server stays light: building the app imports no torch, transformers or workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from app.config import ROOT

PROBE = """
import json, sys
import app.main
app.main.create_app()
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'workers'))))
"""


def test_create_app_imports_no_torch_transformers_or_workers(tmp_path):
    env = {**os.environ, "NEEDLE_DATABASE_URL": f"sqlite:///{tmp_path / 'needle.sqlite'}"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
