"""Artifacts on a real server: content addressing, refusals that store nothing, leases on pushes,
Range downloads, and a SIGKILL mid-upload followed by a restart."""

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.models import Blob, File, Revision
from fedem.hub.settings import HubSettings
from tests.hub.conftest import ADAPTER, BASE, Hub, create_repos, push, put_blob, sha256, start_hub

CONFIG = json.dumps({"model_type": "mamba2", "hidden_size": 64}).encode()


def safetensors_bytes(values: list[float]) -> bytes:
    """A valid one-tensor safetensors file (F32), built by hand to keep the test independent."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}})
    return struct.pack("<Q", len(header)) + header.encode() + data


def counts(hub: Hub) -> tuple[int, int, int]:
    """(blob rows, revision rows, artifact files): what a refused request must leave unchanged."""
    database = hub.db()
    with database.session() as session:
        blobs = session.scalar(select(func.count()).select_from(Blob)) or 0
        revisions = session.scalar(select(func.count()).select_from(Revision)) or 0
    database.engine.dispose()
    return blobs, revisions, len(hub.stored_blobs())


def test_blobs_are_content_addressed_and_uploaded_once(hub: Hub) -> None:
    data = safetensors_bytes([1.0, 2.0, 3.0])
    with hub.client() as client:
        absent = client.head(f"/api/blobs/{sha256(data)}")
        anonymous = put_blob(client, {}, data)
        first = put_blob(client, hub.auth("admin"), data)
        again = put_blob(client, hub.auth("admin"), data)
        present = client.head(f"/api/blobs/{sha256(data)}")

    assert absent.status_code == 404
    assert anonymous.status_code == 401
    assert first.status_code == 201 and first.json() == {
        "sha256": sha256(data),
        "size": len(data),
        "created": True,
    }
    assert again.status_code == 200 and again.json()["created"] is False
    assert present.status_code == 200 and present.headers["x-blob-size"] == str(len(data))
    stored = hub.blobs / sha256(data)[:2] / sha256(data)
    assert hub.stored_blobs() == [stored] and stored.read_bytes() == data
    assert hub.temp_files() == []


def test_wrong_hash_or_size_stores_nothing(hub: Hub) -> None:
    data = b"some plain text\n" * 100
    other = sha256(b"something else")
    with hub.client() as client:
        wrong_hash = client.put(f"/api/blobs/{other}", content=data, headers=hub.auth("admin"))
        short = put_blob(client, hub.auth("admin"), data, size=len(data) + 1)
        long = put_blob(client, hub.auth("admin"), data, size=len(data) - 1)
        not_a_hash = client.put("/api/blobs/..%2F..%2Fetc", content=data, headers=hub.auth("admin"))
        after = [client.head(f"/api/blobs/{sha}").status_code for sha in (other, sha256(data))]

    assert wrong_hash.status_code == 400 and wrong_hash.json()["error"] == "hash_mismatch"
    assert sha256(data) in wrong_hash.json()["message"]
    assert short.status_code == 400 and short.json()["error"] == "size_mismatch"
    assert long.status_code == 400 and long.json()["error"] == "size_mismatch"
    assert not_a_hash.status_code in (404, 422)
    assert after == [404, 404]
    assert counts(hub) == (0, 0, 0) and hub.temp_files() == []


def test_a_cancelled_upload_leaves_nothing(hub: Hub) -> None:
    data = b"y" * 100_000
    request = (
        f"PUT /api/blobs/{sha256(data)} HTTP/1.1\r\nHost: hub\r\nContent-Length: {len(data)}\r\n"
        f"Authorization: Bearer {hub.tokens['admin']}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", hub.sock.getsockname()[1])) as raw:
        raw.sendall(request + data[:30_000])  # then hang up mid-body
        deadline = time.monotonic() + 10
        while not hub.temp_files() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = hub.temp_files()
    deadline = time.monotonic() + 10
    while hub.temp_files() and time.monotonic() < deadline:
        time.sleep(0.02)

    assert started  # the upload was under way when the client hung up
    assert hub.temp_files() == [] and counts(hub) == (0, 0, 0)
    with hub.client() as client:
        assert client.get("/healthz").status_code == 200


def test_oversized_uploads_are_cut_off_with_413(make_hub: Any) -> None:
    hub: Hub = make_hub(max_file_bytes=1000)
    big = b"x" * 5000

    def slow_chunks() -> Iterator[bytes]:  # chunked: no Content-Length, so the limit bites mid-stream
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    with hub.client() as client:
        declared = put_blob(client, hub.auth("admin"), big)
        lying = client.put(
            f"/api/blobs/{sha256(big)}",
            content=slow_chunks(),
            params={"size": 900},
            headers=hub.auth("admin"),
        )
        undeclared = client.put(f"/api/blobs/{sha256(big)}", content=slow_chunks(), headers=hub.auth("admin"))

    assert declared.status_code == 413 and declared.json()["error"] == "too_large"
    assert "1000" in declared.json()["message"]
    # past the declared size (400) or, if chunks arrive coalesced, past the limit (413): cut off either way
    assert (lying.status_code, lying.json()["error"]) in ((400, "size_mismatch"), (413, "too_large"))
    assert undeclared.status_code == 411
    assert counts(hub) == (0, 0, 0) and hub.temp_files() == []


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    hub = start_hub(tmp_path_factory.mktemp("hub"))
    create_repos(hub)
    yield hub
    hub.stop()
    hub.sock.close()


@pytest.mark.parametrize(
    ("path", "content", "error", "hint"),
    [
        ("pytorch_model.bin", b"\x80\x04pickle", "pickle_refused", "use safetensors"),
        ("weights.pt", b"\x80\x04pickle", "pickle_refused", "pickle is never accepted"),
        ("../x.json", b"{}", "bad_path", "'..'"),
        ("a/../../b.json", b"{}", "bad_path", "'..'"),
        ("/etc/x.json", b"{}", "bad_path", "relative"),
        ("a\\b.json", b"{}", "bad_path", "backslash"),
        ("run.py", b"print(1)", "bad_suffix", ".safetensors"),
        ("config.json", b'{"hidden_size": 64,', "bad_content", "malformed JSON"),
        ("model.safetensors", b"not a safetensors file at all", "bad_content", "not a safetensors file"),
        ("model.safetensors", safetensors_bytes([1.0])[:-2], "bad_content", "safetensors data"),
        ("notes.txt", b"caf\xe9\n", "bad_content", "UTF-8"),
        ("data.jsonl", b'{"a": 1}\n{oops}\n', "bad_content", "line 2"),
    ],
)
def test_refused_files_get_a_clear_4xx_and_publish_nothing(
    shared_hub: Hub, path: str, content: bytes, error: str, hint: str
) -> None:
    hub = shared_hub
    with hub.client() as client:
        refused = push(client, hub.auth("admin"), BASE, {"README.md": b"# fine\n", path: content})
        repo = client.get(f"/api/repos/{BASE}").json()

    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == error and hint in refused.json()["message"]
    assert repo["revisions"] == 0 and repo["head"] is None


def test_model_repos_take_releases_from_maintainers_only(shared_hub: Hub) -> None:
    hub = shared_hub
    files = {"config.json": CONFIG, "model.safetensors": safetensors_bytes([0.5, 0.25])}
    with hub.client() as client:
        donor = client.post(
            f"/api/repos/{BASE}/revisions",
            json={"files": [{"path": "config.json", "sha256": sha256(CONFIG), "size": len(CONFIG)}]},
            headers=hub.auth("ann"),
        )
        missing = client.post(
            f"/api/repos/{BASE}/revisions",
            json={"files": [{"path": "x.json", "sha256": "0" * 64, "size": 2}]},
            headers=hub.auth("admin"),
        )
        release = push(client, hub.auth("admin"), BASE, files, description="first release")

    assert donor.status_code == 403
    assert missing.status_code == 422 and missing.json()["missing"] == ["0" * 64]
    assert release.status_code == 201, release.text
    body = release.json()
    assert body["tag"] == "v1" and len(body["commit"]) == 40 and body["parent"] is None
    assert body["contributor"] == "admin" and body["status"] == "accepted"
    assert [f["path"] for f in body["files"]] == ["config.json", "model.safetensors"]


def test_adapter_push_needs_the_pushers_live_lease(hub: Hub) -> None:
    base_files = {"config.json": CONFIG, "model.safetensors": safetensors_bytes([1.0, 2.0])}
    adapter = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": safetensors_bytes([3.0])}
    with hub.client() as client:
        assert push(client, hub.auth("admin"), BASE, base_files).status_code == 201
        before = counts(hub)
        no_lease_upload = put_blob(client, hub.auth("ann"), adapter["adapter_config.json"])
        no_lease_push = push(client, hub.auth("admin"), ADAPTER, adapter)  # blobs exist, lease doesn't
        unchanged = counts(hub)[1]
        bo_lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("bo")).json()
        stolen = push(client, hub.auth("ann"), ADAPTER, adapter, lease_id=bo_lease["lease_id"])
        client.delete(f"/api/leases/{bo_lease['lease_id']}", headers=hub.auth("bo")).raise_for_status()
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        pushed = push(
            client, hub.auth("ann"), ADAPTER, adapter, lease_id=lease["lease_id"], metrics={"loss": 1.5}
        )
        twice = push(client, hub.auth("ann"), ADAPTER, adapter, lease_id=lease["lease_id"])
        log = client.get(f"/api/repos/{ADAPTER}/log").json()

    assert stolen.status_code == 403
    assert no_lease_upload.status_code == 409 and no_lease_upload.json()["error"] == "lease_required"
    assert no_lease_push.status_code == 409 and no_lease_push.json()["error"] == "lease_required"
    assert unchanged == before[1]
    assert pushed.status_code == 201, pushed.text
    assert pushed.json()["base"] == f"{BASE}@v1" and pushed.json()["metrics"] == {"loss": 1.5}
    assert twice.status_code == 409  # the push ended the lease
    assert [r["tag"] for r in log] == ["v1"]


def test_push_with_an_expired_lease_is_refused_and_stores_nothing(make_hub: Any) -> None:
    hub: Hub = make_hub(lease_ttl_s=1, sweep_every_s=3600)
    create_repos(hub)
    adapter = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": safetensors_bytes([4.0])}
    with hub.client() as client:
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
        time.sleep(1.3)
        before = counts(hub)
        upload = put_blob(client, hub.auth("ann"), adapter["adapter_config.json"])
        manifest = [{"path": p, "sha256": sha256(d), "size": len(d)} for p, d in adapter.items()]
        publish = client.post(
            f"/api/repos/{ADAPTER}/revisions",
            json={"files": manifest, "lease_id": lease["lease_id"]},
            headers=hub.auth("ann"),
        )

    assert upload.status_code == 410 and upload.json()["error"] == "lease_expired"
    assert publish.status_code == 410 and publish.json()["error"] == "lease_expired"
    assert counts(hub) == before == (0, 0, 0)


def test_range_requests_return_the_right_slice(hub: Hub) -> None:
    data = safetensors_bytes([float(i) for i in range(256)])
    with hub.client() as client:
        commit = push(client, hub.auth("admin"), BASE, {"model.safetensors": data}).json()["commit"]
        url = f"/{BASE}/resolve/v1/model.safetensors"
        head = client.head(url)
        middle = client.get(url, headers={"Range": "bytes=100-199"})
        tail = client.get(url, headers={"Range": "bytes=-16"})
        beyond = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})

    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    assert head.headers["x-repo-commit"] == commit and head.headers["etag"] == f'"{sha256(data)}"'
    assert middle.status_code == 206 and middle.content == data[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert tail.status_code == 206 and tail.content == data[-16:]
    assert beyond.status_code == 416


def test_remote_stores_stream_ranges_too(tmp_path: Path) -> None:
    """A non-local fsspec store (memory://) goes through fs.mv and the streamed Range reader."""
    app = create_app(HubSettings(root=tmp_path, store_url="memory://fedem-test-store"))
    with app.state.db.session() as session:
        token = create_user(session, "admin", "maintainer")[1]
        session.commit()
    auth = {"Authorization": f"Bearer {token}"}
    data = safetensors_bytes([float(i) for i in range(64)])
    with TestClient(app) as client:
        client.post("/api/repos", json={"name": BASE, "kind": "model"}, headers=auth).raise_for_status()
        pushed = push(client, auth, BASE, {"model.safetensors": data})  # type: ignore[arg-type]
        whole = client.get(f"/{BASE}/resolve/main/model.safetensors")
        part = client.get(f"/{BASE}/resolve/v1/model.safetensors", headers={"Range": "bytes=8-15"})
        beyond = client.get(f"/{BASE}/resolve/v1/model.safetensors", headers={"Range": "bytes=99999-"})

    assert pushed.status_code == 201, pushed.text
    assert whole.status_code == 200 and whole.content == data
    assert part.status_code == 206 and part.content == data[8:16]
    assert part.headers["content-range"] == f"bytes 8-15/{len(data)}"
    assert beyond.status_code == 416
    assert app.state.store.fs.ls(app.state.store.temp_dir) == []


def test_sigkill_mid_upload_leaves_no_partial_artifact_and_a_restart_keeps_everything(hub: Hub) -> None:
    releases = [
        {"config.json": CONFIG, "model.safetensors": safetensors_bytes([1.0] * 1000)},
        {"config.json": CONFIG, "model.safetensors": safetensors_bytes([2.0] * 1000)},
    ]
    with hub.client() as client:
        for files in releases:
            assert push(client, hub.auth("admin"), BASE, files).status_code == 201
    before = counts(hub)
    big = b"\0" * (64 << 20)
    sent = threading.Event()
    outcome: list[Any] = []

    def trickle() -> Iterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]
            if start >= 4 << 20:
                sent.set()
                time.sleep(0.05)

    def upload() -> None:
        try:
            outcome.append(
                httpx.put(
                    f"{hub.url}/api/blobs/{sha256(big)}",
                    content=trickle(),
                    params={"size": len(big)},
                    headers=hub.auth("admin"),
                    timeout=30,
                )
            )
        except httpx.TransportError as err:
            outcome.append(err)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert sent.wait(30)
    deadline = time.monotonic() + 10
    while not any(hub.temp_sizes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    partial = hub.temp_files()
    hub.kill()
    uploader.join(30)

    assert partial and isinstance(outcome[-1], httpx.TransportError)  # cut off mid-body
    hub.start()  # same root, same port
    with hub.client() as client:
        big_head = client.head(f"/api/blobs/{sha256(big)}")
        downloads = [
            {p: client.get(f"/{BASE}/resolve/v{n}/{p}").content for p in files}
            for n, files in enumerate(releases, start=1)
        ]
    database = hub.db()
    with database.session() as session:
        integrity = session.execute(text("PRAGMA integrity_check")).scalar()
        rows = session.scalars(select(Blob)).all()
        dangling = session.scalars(select(File).where(File.sha256.not_in([b.sha256 for b in rows]))).all()
    database.engine.dispose()

    assert big_head.status_code == 404
    assert hub.temp_files() == [] and not (hub.blobs / sha256(big)[:2] / sha256(big)).exists()
    assert counts(hub) == before
    assert downloads == releases
    assert integrity == "ok" and dangling == []
    for row in rows:  # every visible blob has its bytes, matching its hash
        assert sha256((hub.blobs / row.sha256[:2] / row.sha256).read_bytes()) == row.sha256
