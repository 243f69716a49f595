"""The install is the tested set: every package Needle and its test extras take is pinned in
constraints.txt, every install command uses it, and what is installed is what is pinned."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[canonicalize_name(name)] = version
    return out


def required(extras: tuple[str, ...]) -> set[str]:
    """The distributions Needle's own requirements (with these extras) take, transitively, on this
    machine: each named requirement and, for each installed one, its own requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for sub in metadata.requires(req.name) or []:
            sub_req = Requirement(sub)
            env = {**default_environment(), "extra": ""}
            wanted = [env] + [{**env, "extra": e} for e in req.extras]
            if sub_req.marker is None or any(sub_req.marker.evaluate(e) for e in wanted):
                todo.append(sub_req)
    return seen


def test_every_package_the_test_install_takes_is_pinned():
    missing = sorted(required(("test",)) - set(pins()))
    assert not missing, f"not pinned in constraints.txt: {missing}"


def test_what_is_installed_is_what_is_pinned():
    pinned = pins()
    wrong = {}
    for name in required(("test",)):
        installed = metadata.version(name).split("+")[0]  # torch's local label (+cpu) aside
        if pinned.get(name) != installed:
            wrong[name] = (installed, pinned.get(name))
    assert not wrong, f"installed versions differ from constraints.txt (installed, pinned): {wrong}"


def test_every_install_command_uses_the_constraints():
    for path in ("scripts/test.sh", "scripts/demo.sh", "Dockerfile"):
        text = (ROOT / path).read_text()
        installs = [line for line in text.splitlines() if re.search(r"pip install", line)]
        assert installs, path
        for line in installs:
            assert line.count("pip install") == line.count("-c constraints.txt"), f"{path}: {line}"


def test_ci_builds_a_fresh_virtualenv_and_runs_the_test_command():
    text = (ROOT / ".ci/run").read_text()
    assert "python3 -m venv" in text and "/bin/activate" in text
    assert text.index("/bin/activate") < text.index("./scripts/test.sh")


def test_the_test_command_lints_and_type_checks():
    text = (ROOT / "scripts/test.sh").read_text()
    assert "ruff check" in text and "mypy" in text and "pytest" in text
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert config["ruff"]["lint"]["select"] and set(config["mypy"]["files"]) >= {"app", "needle"}
