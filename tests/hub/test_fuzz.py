"""Fuzzing the hub against its own OpenAPI schema (schemathesis): no 5xx, every answer as documented.

Every operation of `/openapi.json` gets schema-driven requests — valid ones (positive mode) and
ones that break the schema (negative mode) — as an anonymous caller, a donor and a maintainer, on a hub
holding a released base model and an adapter repo; some of the requests name those real repos and
revisions in their path, so they reach past the 404s. Each answer must not be a server error, and its
status code, content type, headers and body must be what the schema declares. Examples are
derandomised (the same requests every run) and bounded, so this takes well under a minute.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.settings import HubSettings
from tests.hub.conftest import ADAPTER, BASE, USERS, push

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 30
CALLERS = ("anonymous", "ann", "admin")
# path parameters naming what exists on the fuzzed hub
KNOWN_PATHS = [
    {"namespace": "seshu", "name": "base", "revision": "v1", "path": "config.json"},
    {"namespace": "seshu", "name": "adapter-en-hi", "revision": "main", "path": "README.md"},
]


@pytest.fixture(scope="module")
def fuzzed_hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[FastAPI, dict[str, str]]:
    """An in-process hub (no rate limit, so every fuzzed request is judged on its own) with a base
    release v1 and an adapter repo."""
    root: Path = tmp_path_factory.mktemp("fuzz-hub")
    app = create_app(HubSettings(root=root, rate_limit_per_s=None))
    with app.state.db.session() as session:
        tokens = {name: create_user(session, name, role)[1] for name, role in USERS}  # type: ignore[arg-type]
        session.commit()
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    with TestClient(app) as client:
        repos = ({"name": BASE, "kind": "model"}, {"name": ADAPTER, "kind": "adapter", "base_repo": BASE})
        for body in repos:
            client.post("/api/repos", json=body, headers=admin).raise_for_status()
        files = {"config.json": b'{"model_type": "mamba2"}', "README.md": b"# base\n"}
        push(client, admin, BASE, files).raise_for_status()  # type: ignore[arg-type]
    return app, tokens


def test_every_operation_answers_as_its_schema_says(fuzzed_hub: tuple[FastAPI, dict[str, str]]) -> None:
    app, tokens = fuzzed_hub
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # the whole API, not an empty schema
    for operation in operations:
        fuzz(operation, tokens)


def fuzz(operation: Any, tokens: dict[str, str]) -> None:
    """Run `EXAMPLES_PER_OPERATION` generated requests against one operation, each with every check."""
    names = {parameter.name for parameter in operation.path_parameters}
    strategies = [operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    if names & {"namespace", "name"}:
        strategies += [
            operation.as_strategy(path_parameters={k: v for k, v in known.items() if k in names})
            for known in KNOWN_PATHS
        ]

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies), caller=st.sampled_from(CALLERS))
    def run(case: Any, caller: str) -> None:
        headers = {} if caller == "anonymous" else {"Authorization": f"Bearer {tokens[caller]}"}
        case.call_and_validate(headers=headers, checks=CHECKS)

    run_test: Callable[[], None] = run
    run_test()
