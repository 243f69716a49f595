"""The JSON API fuzzed with schemathesis against the app's own OpenAPI description
(/-/openapi.json, app/openapi.py): every operation, the .json twins and the live requests'
bodies included, sent to a real server over a real database (SQLite and Postgres) that holds a
synthetic model full of hostile strings (tests/hostile.py). No answer may be a 5xx.

Random path parameters alone would almost never name the stored model, so each one is, half
the time, replaced by a value that exists (the model, a layer, a neuron, the stored text run,
curve, generation or feature), and the fuzzing reaches the page builders behind the 404s.
Bounded: at most MAX_EXAMPLES cases per operation and generation phase.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from app.config import Settings
from app.db import engine_for
from app.main import create_app
from tests.hostile import FEATURE, MODEL, MODEL_B, N_LAYERS, fill_hostile
from tests.live_server import running_server

MAX_EXAMPLES = 20


def existing_values(ids: dict) -> dict[str, list[str]]:
    return {
        "model": [MODEL],
        "a": [MODEL, MODEL_B],
        "b": [MODEL_B, MODEL],
        "layer": [str(layer) for layer in range(N_LAYERS)],
        "neuron": ["0", "1"],
        "run": [str(ids["run"]), str(ids["failed_run"])],
        "curve": [str(ids["curve"])],
        "gen": [str(ids["generation"])],
        "feature": [FEATURE, "skipped_feature"],
    }


@pytest.fixture
def api_schema(db_url):
    ids = fill_hostile(engine_for(db_url))
    known = existing_values(ids)
    # no rate limit: the fuzzer is one client sending hundreds of live requests
    app = create_app(Settings(database_url=db_url, live_rate_per_minute=0))
    with running_server(app) as base:
        schema = schemathesis.openapi.from_url(f"{base}/-/openapi.json")
        schema.config.update(base_url=base)

        @schema.hook
        def flatmap_path_parameters(context, path_parameters):
            if not isinstance(path_parameters, dict):  # an operation without path parameters: None
                return st.just(path_parameters)
            return st.fixed_dictionaries({
                name: st.one_of(st.just(value), st.sampled_from(known[name])) if name in known else st.just(value)
                for name, value in path_parameters.items()
            })

        yield schema


def test_the_schema_describes_every_page_and_its_json_twin(db_url):
    app = create_app(Settings(database_url=db_url))
    with running_server(app) as base:
        paths = httpx.get(f"{base}/-/openapi.json").json()["paths"]
    for page in ("/{model}", "/{model}/{layer}", "/{model}/{layer}/{neuron}", "/{model}/features/{feature}",
                 "/{model}/{layer}/{neuron}/text/{run}", "/{model}/{layer}/{neuron}/clamp/{curve}",
                 "/{model}/{layer}/{neuron}/generate/{gen}"):
        assert "get" in paths[page] and "application/json" in paths[page + ".json"]["get"]["responses"]["200"]["content"]
    for twin in ("/-/models.json", "/{model}/search.json", "/{model}/features.json", "/-/jobs.json"):
        assert "get" in paths[twin], twin
    for live in ("text", "clamp", "generate"):
        post = paths["/{model}/{layer}/{neuron}/" + live]["post"]
        assert set(post["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}
        assert {"202", "400", "403", "404", "429"} <= set(post["responses"])


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_operation_answers_with_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
