"""Access control on a real server: tokens at rest, rate and size limits, CORS, the audit log, and what
a donor may not see or do."""

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from alembic import command
from alembic.config import Config
from sqlalchemy import select, text

from fedem.hub.auth import HASHER, split_token, verify_secret
from fedem.hub.db import MIGRATIONS, make_engine
from fedem.hub.models import User
from tests.hub.conftest import ADAPTER, BASE, Hub, push, sha256

LEGACY_TOKEN = "fedem_" + "Q" * 43  # the pre-argon2 format: no id part, sha256 kept in the database


def users(hub: Hub) -> dict[str, User]:
    database = hub.db()
    with database.session() as session:
        rows = {user.name: user for user in session.scalars(select(User))}
    database.engine.dispose()
    return rows


def database_bytes(hub: Hub) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(hub.root.glob("hub.db*")))


def make_legacy_database(root: Path) -> None:
    """A hub database as it was before migration 0003, holding one user with a sha256-hashed token."""
    root.mkdir(parents=True)
    engine = make_engine(f"sqlite:///{root / 'hub.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        connection.execute(
            text(
                "INSERT INTO users (name, role, pseudonym, token_hash, created_at) "
                "VALUES ('old', 'donor', 'donor-0ld0ld00', :hash, '2025-01-01 00:00:00')"
            ),
            {"hash": hashlib.sha256(LEGACY_TOKEN.encode()).hexdigest()},
        )
    engine.dispose()


def test_tokens_are_argon2_hashes_at_rest_and_old_tokens_survive_the_migration(
    make_hub: Any, tmp_path: Path
) -> None:
    make_legacy_database(tmp_path / "hub0")  # make_hub's first hub lives in tmp_path/hub0
    hub: Hub = make_hub()
    rows = users(hub)
    stored = database_bytes(hub)

    for name, token in hub.tokens.items():
        token_id, secret = split_token(token) or ("", "")
        assert rows[name].token_id == token_id and rows[name].token_hash.startswith("$argon2id$")
        assert secret.encode() not in stored and sha256(token.encode()).encode() not in stored
    legacy_sha256 = hashlib.sha256(LEGACY_TOKEN.encode()).hexdigest()
    assert rows["old"].token_hash.startswith("$argon2id$") and legacy_sha256.encode() not in stored

    ann_id = (split_token(hub.tokens["ann"]) or ("", ""))[0]
    bo_secret = (split_token(hub.tokens["bo"]) or ("", ""))[1]
    with hub.client() as client:
        assert (
            client.get("/api/whoami", headers={"Authorization": f"Bearer {LEGACY_TOKEN}"}).json()["name"]
            == "old"
        )
        assert client.get("/api/whoami", headers=hub.auth("ann")).json()["name"] == "ann"
        for forged in (
            f"fedem_{ann_id}.{bo_secret}",  # ann's id with another user's secret
            hub.tokens["ann"][:-1] + ("A" if hub.tokens["ann"][-1] != "A" else "B"),  # one character off
            hub.tokens["ann"].replace(".", ""),  # no id part: read as a pre-argon2 token, unknown
            "fedem_nothex0000000000.secret",
            "Basic " + hub.tokens["ann"],
        ):
            header = forged if forged.startswith("Basic ") else f"Bearer {forged}"
            reply = client.get("/api/whoami", headers={"Authorization": header})
            assert reply.status_code == 401 and reply.json()["error"] == "unauthorized", forged


def test_a_remembered_token_does_not_outlive_its_hash() -> None:
    """The per-process cache of verified tokens is keyed by the stored hash: a token re-issued under
    the same id (a new hash) is verified afresh, and the old secret no longer passes."""
    first, second = "first-secret", "second-secret"
    first_hash, second_hash = HASHER.hash(first), HASHER.hash(second)
    assert verify_secret("00000000000000aa", first, first_hash)
    assert verify_secret("00000000000000aa", first, first_hash)  # from the cache
    assert not verify_secret("00000000000000aa", first, second_hash)
    assert verify_secret("00000000000000aa", second, second_hash)
    assert not verify_secret("00000000000000aa", first, second_hash)


def test_each_token_has_its_own_rate_limit_and_guessing_is_throttled_too(make_hub: Any) -> None:
    hub: Hub = make_hub(rate_limit_per_s=1.0, rate_limit_burst=3)
    ann_id = (split_token(hub.tokens["ann"]) or ("", ""))[0]
    with hub.client() as client:
        allowed = [client.get("/api/whoami", headers=hub.auth("ann")).status_code for _ in range(3)]
        limited = client.get("/api/whoami", headers=hub.auth("ann"))
        guess = client.get("/api/whoami", headers={"Authorization": f"Bearer fedem_{ann_id}.guess"})
        others = client.get("/api/whoami", headers=hub.auth("bo"))
        anonymous = [client.get("/api/repos").status_code for _ in range(5)]
        time.sleep(float(limited.headers["Retry-After"]))
        later = client.get("/api/whoami", headers=hub.auth("ann"))

    assert allowed == [200, 200, 200]
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1 and "at most 1/s" in limited.json()["message"]
    assert guess.status_code == 429  # the secret is not even checked: guessing costs the same budget
    assert others.status_code == 200 and anonymous == [200] * 5
    assert later.status_code == 200


def test_json_bodies_are_size_limited_but_blob_uploads_are_not(make_hub: Any) -> None:
    hub: Hub = make_hub(max_json_bytes=4096)
    big = {"name": "seshu/big", "kind": "model", "base_repo": "x" * 10_000}

    def chunked() -> Iterator[bytes]:
        encoded = json.dumps(big).encode()
        for start in range(0, len(encoded), 1000):
            yield encoded[start : start + 1000]

    with hub.client() as client:
        declared = client.post("/api/repos", json=big, headers=hub.auth("admin"))
        streamed = client.post(
            "/api/repos",
            content=chunked(),
            headers={**hub.auth("admin"), "Content-Type": "application/json"},
        )
        small = client.post(
            "/api/repos", json={"name": "seshu/small", "kind": "model"}, headers=hub.auth("admin")
        )
        blob = b"x" * 50_000
        upload = client.put(f"/api/blobs/{sha256(blob)}", content=blob, headers=hub.auth("admin"))
        repos = [repo["name"] for repo in client.get("/api/repos").json()]

    for reply in (declared, streamed):
        assert reply.status_code == 413 and reply.json()["error"] == "too_large"
        assert "4096 bytes" in reply.json()["message"]
    assert small.status_code == 201 and upload.status_code == 201
    assert repos == ["seshu/small"]


def test_cors_is_off_unless_origins_are_named(make_hub: Any) -> None:
    default: Hub = make_hub()
    opened: Hub = make_hub(cors_origins=["https://dash.example.org"])
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}

    def ask(hub: Hub, origin: str) -> tuple[httpx.Response, httpx.Response]:
        with hub.client() as client:
            options = client.options("/api/repos", headers={"Origin": origin, **preflight})
            get = client.get("/api/repos", headers={"Origin": origin})
        return options, get

    for reply in ask(default, "https://dash.example.org"):
        assert not any(h.lower().startswith("access-control-") for h in reply.headers), reply.headers
    options, get = ask(opened, "https://dash.example.org")
    assert options.status_code == 200
    assert options.headers["access-control-allow-origin"] == "https://dash.example.org"
    assert get.headers["access-control-allow-origin"] == "https://dash.example.org"
    for reply in ask(opened, "https://evil.example.com"):
        assert "access-control-allow-origin" not in reply.headers


def test_every_maintainer_action_is_audited(hub: Hub) -> None:
    admin = hub.auth("admin")
    with hub.client() as client:
        client.post("/api/users", json={"name": "cy", "role": "donor"}, headers=admin).raise_for_status()
        push(client, admin, BASE, {"config.json": b"{}"}).raise_for_status()
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        client.delete(f"/api/leases/{lease['lease_id']}", headers=admin).raise_for_status()
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        pushed = push(client, hub.auth("ann"), ADAPTER, {"notes.md": b"v1\n"}, lease_id=lease["lease_id"])
        decision = {"decision": "rejected", "reason": "spam"}
        client.post(
            f"/api/evaluations/{pushed.json()['commit']}/decision", json=decision, headers=admin
        ).raise_for_status()
        log = client.get("/api/audit", headers=admin).json()
        as_donor = client.get("/api/audit", headers=hub.auth("ann"))

    admin_id = users(hub)["admin"].id
    by_admin = [event["action"] for event in reversed(log) if event["actor_id"] == admin_id]
    assert by_admin == [
        "create_repo",
        "create_repo",
        "add_user",
        "push",
        "lease_released",
        "evaluation_override",
    ]
    override = next(event for event in log if event["action"] == "evaluation_override")
    assert override["detail"]["reason"] == "spam" and override["detail"]["before"]["decision"] is None
    assert as_donor.status_code == 403


def test_a_donor_sees_no_contributor_names_before_the_decision(hub: Hub) -> None:
    with hub.client() as client:
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        taken = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("bo"))
        files = {"notes.md": b"ann's version\n"}
        pushed = push(client, hub.auth("ann"), ADAPTER, files, lease_id=lease["lease_id"]).json()
        views = [
            taken,
            client.get(f"/api/repos/{ADAPTER}/log"),
            client.get(f"/api/repos/{ADAPTER}/log", headers=hub.auth("bo")),
            client.get(f"/api/models/{ADAPTER}/revision/v1"),
            client.get(f"/{ADAPTER}/resolve/v1/notes.md"),
        ]
        refused = [
            client.get(path, headers=hub.auth("bo"))
            for path in (
                "/api/evaluations",
                f"/api/evaluations/{pushed['commit']}",
                "/api/audit",
                "/api/leases",
            )
        ]
        decision = {"decision": "accepted", "reason": "ok"}
        client.post(
            f"/api/evaluations/{pushed['commit']}/decision", json=decision, headers=hub.auth("admin")
        ).raise_for_status()
        after = client.get(f"/api/repos/{ADAPTER}/log", headers=hub.auth("bo")).json()

    assert taken.status_code == 409 and pushed["status"] == "pending"
    for view in views:
        assert '"ann"' not in view.text and "ann" not in json.dumps(dict(view.headers)), view.url
    assert [reply.status_code for reply in refused] == [403] * 4
    assert after[0]["contributor"] == "ann"  # named once decided


def test_a_donor_cannot_publish_accept_or_overwrite_anothers_version(hub: Hub) -> None:
    other = "seshu/adapter-en-ta"
    with hub.client() as client:
        client.post(
            "/api/repos",
            json={"name": other, "kind": "adapter", "base_repo": BASE},
            headers=hub.auth("admin"),
        ).raise_for_status()
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        bo_lease = client.post(f"/api/adapters/{other}/lease", headers=hub.auth("bo")).json()
        files = {"notes.md": b"ann's version\n"}
        # bo, holding a lease of his own, tries to push into ann's lease and to end it
        hijack = push(client, hub.auth("bo"), ADAPTER, {"notes.md": b"bo's\n"}, lease_id=lease["lease_id"])
        end = client.delete(f"/api/leases/{lease['lease_id']}", headers=hub.auth("bo"))
        mine = push(client, hub.auth("ann"), ADAPTER, files, lease_id=lease["lease_id"]).json()
        # … to accept ann's version (or ann her own), to replace its bytes, to publish a release
        accept = {"decision": "accepted", "reason": "looks fine"}
        decisions = [
            client.post(f"/api/evaluations/{mine['commit']}/decision", json=accept, headers=hub.auth(who))
            for who in ("bo", "ann")
        ]
        same_size = client.put(
            f"/api/blobs/{sha256(files['notes.md'])}",
            content=b"X" * len(files["notes.md"]),
            headers=hub.auth("bo"),
        )
        other_size = client.put(
            f"/api/blobs/{sha256(files['notes.md'])}", content=b"bo's bytes", headers=hub.auth("bo")
        )
        release = push(client, hub.auth("bo"), BASE, {"config.json": b"{}"})
        again = push(client, hub.auth("bo"), ADAPTER, {"notes.md": b"bo's\n"}, lease_id=bo_lease["lease_id"])
        log = client.get(f"/api/repos/{ADAPTER}/log").json()
        served = client.get(f"/{ADAPTER}/resolve/v1/notes.md").content

    assert hijack.status_code == 403 and end.status_code == 403
    assert [reply.status_code for reply in decisions] == [403, 403]
    assert same_size.status_code == 200 and same_size.json()["created"] is False  # kept, not replaced
    assert other_size.status_code == 400 and other_size.json()["error"] == "size_mismatch"
    assert release.status_code == 403 and again.status_code == 409
    assert [(r["tag"], r["status"]) for r in log] == [("v1", "pending")]
    assert served == files["notes.md"]
