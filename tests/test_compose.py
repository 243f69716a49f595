"""docker-compose.yml is for users (no Docker engine here): check it parses and holds the
services the README promises, wired to one Postgres."""

from __future__ import annotations

import yaml


def test_compose_has_postgres_migrate_web_and_gpu_worker(repo_root):
    doc = yaml.safe_load((repo_root / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"postgres", "migrate", "web", "worker"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["needle", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    urls = {services[n]["environment"]["NEEDLE_DATABASE_URL"] for n in ("migrate", "web", "worker")}
    assert len(urls) == 1 and urls.pop().startswith("postgresql+psycopg://")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_references_resolve_and_workers_stop_cleanly(repo_root):
    """What `docker compose config` would reject: a dependency on a service that is not
    there, a named volume that is not declared. And the worker's stop: SIGTERM, which
    `needle worker` answers by giving its job back (tests/test_workers.py)."""
    doc = yaml.safe_load((repo_root / "docker-compose.yml").read_text())
    services, volumes = doc["services"], set(doc.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, (name, dep)
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in volumes, (name, source)
        assert "image" in svc or "build" in svc, name
    assert services["worker"]["stop_signal"] == "SIGTERM"
    assert services["worker"]["command"] == ["needle", "worker"]
