"""Lease rules on a real app and a real SQLite file: one live lease, expiry, sweeper, audit."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.settings import HubSettings

ADAPTER = "seshu/adapter-en-hi"


def _hub(root: Path, **settings: float) -> tuple[TestClient, dict[str, dict[str, str]]]:
    app = create_app(HubSettings(root=root, **settings))  # type: ignore[arg-type]
    with app.state.db.session() as session:
        tokens = {
            name: create_user(session, name, role)[1]
            for name, role in (("admin", "maintainer"), ("ann", "donor"), ("bo", "donor"))
        }
        session.commit()
    headers = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    client = TestClient(app)
    client.__enter__()
    client.post("/api/repos", json={"name": "seshu/base", "kind": "model"}, headers=headers["admin"])
    client.post(
        "/api/repos",
        json={"name": ADAPTER, "kind": "adapter", "base_repo": "seshu/base"},
        headers=headers["admin"],
    )
    return client, headers


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]]]]:
    client, headers = _hub(tmp_path)
    yield client, headers
    client.__exit__(None, None, None)


def test_second_lease_is_refused_with_holder_and_expiry(
    hub: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, headers = hub
    first = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["ann"])

    second = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["bo"])

    assert first.status_code == 201
    assert second.status_code == 409
    body = second.json()
    assert body["error"] == "leased"
    assert body["holder"] == first.json()["holder"] and body["holder"].startswith("donor-")
    assert "ann" not in second.text  # the holder is shown by pseudonym only
    assert body["expires_at"].startswith(first.json()["expires_at"][:19])


def test_release_frees_the_adapter_and_only_the_holder_may_release(
    hub: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, headers = hub
    lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["ann"]).json()

    stranger = client.delete(f"/api/leases/{lease['lease_id']}", headers=headers["bo"])
    released = client.delete(f"/api/leases/{lease['lease_id']}", headers=headers["ann"])
    again = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["bo"])

    assert stranger.status_code == 403
    assert released.status_code == 200 and released.json()["outcome"] == "released"
    assert again.status_code == 201


def test_expired_lease_is_not_honoured_between_sweeps(tmp_path: Path) -> None:
    client, headers = _hub(tmp_path, lease_ttl_s=1, sweep_every_s=3600)
    try:
        client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["ann"])
        time.sleep(1.2)

        taken_over = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["bo"])

        assert taken_over.status_code == 201
        actions = [e["action"] for e in client.get("/api/audit", headers=headers["admin"]).json()]
        assert "lease_expired" in actions
    finally:
        client.__exit__(None, None, None)


def test_sweeper_ends_expired_leases(tmp_path: Path) -> None:
    client, headers = _hub(tmp_path, lease_ttl_s=1, sweep_every_s=0.2)
    try:
        client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["ann"])
        deadline = time.monotonic() + 10
        while client.get("/api/leases", headers=headers["admin"]).json() and time.monotonic() < deadline:
            time.sleep(0.2)

        assert client.get("/api/leases", headers=headers["admin"]).json() == []
    finally:
        client.__exit__(None, None, None)


def test_audit_is_for_maintainers_and_state_survives_a_restart(tmp_path: Path) -> None:
    client, headers = _hub(tmp_path)
    lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["ann"]).json()
    assert client.get("/api/audit", headers=headers["ann"]).status_code == 403
    client.__exit__(None, None, None)

    restarted = TestClient(create_app(HubSettings(root=tmp_path)))
    with restarted:
        live = restarted.get("/api/leases", headers=headers["admin"]).json()
        refused = restarted.post(f"/api/adapters/{ADAPTER}/lease", headers=headers["bo"])

    assert [row["lease_id"] for row in live] == [lease["lease_id"]]
    assert refused.status_code == 409


def test_only_adapters_are_leased_and_writes_need_a_token(
    hub: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, headers = hub
    assert client.post("/api/adapters/seshu/base/lease", headers=headers["ann"]).status_code == 422
    assert client.post(f"/api/adapters/{ADAPTER}/lease").status_code == 401
    bad = client.post(f"/api/adapters/{ADAPTER}/lease", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
