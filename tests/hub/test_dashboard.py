"""The dashboard, end to end: a real hub (uvicorn) in a realistic state — two scored releases, a relay of
adapter versions decided by a maintainer, one still under review, a live lease — read as HTML and in
headless Chromium on a desktop and a phone screen.

The browser tests need Playwright (PyPI) and Debian's `chromium`; where either is absent they skip
with the reason (`.ci/run` installs chromium). With `FEDEM_SCREENSHOTS=DIR` they save each page's
screenshots there: `make screenshots` refreshes the ones in docs/dashboard/.
"""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hub.conftest import ADAPTER, BASE, Hub, push

CHROMIUM = "/usr/bin/chromium"
PAGES = {
    "overview": "/dashboard",
    "adapters": "/dashboard/adapters",
    "adapter": f"/dashboard/adapters/{ADAPTER}",
    "queue": "/dashboard/queue",
    "contributors": "/dashboard/contributors",
    "data": "/dashboard/data",
}
SCREENS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
RELEASE_BPB = ({"en": 2.41, "hi": 1.62, "ta": 1.71}, {"en": 2.30, "hi": 1.49, "ta": 1.60})


def lease(client: httpx.Client, hub: Hub, who: str) -> str:
    reply = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth(who))
    assert reply.status_code == 201, reply.text
    lease_id: str = reply.json()["lease_id"]
    return lease_id


def donate(client: httpx.Client, hub: Hub, who: str, seed: int, examples: int) -> dict[str, Any]:
    """One relay turn: lease, push a (small, distinct) version with a donor's metrics."""
    files = {"adapter_config.json": json.dumps({"r": 4, "seed": seed}).encode()}
    metrics = {
        "eval_bpb": 1.5 - seed / 100,
        "train_examples": examples,
        "language": "hi",
        "task": "translate",
    }
    reply = push(
        client, hub.auth(who), ADAPTER, files,
        lease_id=lease(client, hub, who), base=f"{BASE}@v2", metrics=metrics,
        description=f"{examples} translation examples from en-hi.tsv",
    )  # fmt: skip
    assert reply.status_code == 201, reply.text
    version: dict[str, Any] = reply.json()
    return version


def decide(client: httpx.Client, hub: Hub, commit: str, decision: str) -> None:
    body = {"decision": decision, "reason": "reviewed on the held-out set"}
    reply = client.post(f"/api/evaluations/{commit}/decision", json=body, headers=hub.auth("admin"))
    assert reply.status_code == 200, reply.text


@pytest.fixture
def community(hub: Hub) -> Hub:
    """v1 and v2 of the base with bits-per-byte per language; on the adapter: ann's v1 accepted, bo's
    v2 rejected, ann's v3 pending (under review), and bo holding the lease now."""
    with hub.client() as client:
        for number, bpb in enumerate(RELEASE_BPB, start=1):
            files = {"config.json": json.dumps({"release": number}).encode()}
            reply = push(
                client, hub.auth("admin"), BASE, files, description=f"release {number}", metrics={"bpb": bpb}
            )
            assert reply.status_code == 201, reply.text
        decide(client, hub, donate(client, hub, "ann", seed=1, examples=184)["commit"], "accepted")
        decide(client, hub, donate(client, hub, "bo", seed=2, examples=90)["commit"], "rejected")
        donate(client, hub, "ann", seed=3, examples=200)
        lease(client, hub, "bo")
    return hub


def pseudonym(hub: Hub, who: str) -> str:
    with hub.client() as client:
        reply = client.get("/api/whoami", headers=hub.auth(who))
        assert reply.status_code == 200, reply.text
        name: str = reply.json()["pseudonym"]
        return name


def text_of(html: str) -> str:
    """The words of a page's <main>, tags dropped and spaces collapsed."""
    found = re.search(r"<main>(.*)</main>", html, re.S)
    assert found, html
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(1)))


def test_every_page_renders_the_federation_without_a_token(community: Hub) -> None:
    ann, bo = pseudonym(community, "ann"), pseudonym(community, "bo")
    with community.client() as client:
        pages = {name: client.get(path) for name, path in PAGES.items()}
        assert all(
            r.status_code == 200 and r.headers["content-type"].startswith("text/html") for r in pages.values()
        )
        text = {name: text_of(r.text) for name, r in pages.items()}
        svg = client.get(f"/dashboard/maturity/{BASE}.svg")
        assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
        assert client.get("/dashboard/adapters/seshu/nothing").status_code == 404
        assert client.get("/dashboard/maturity/seshu/nothing.svg").status_code == 404

    # releases: both, with their bits per byte per language, and a plot with one line per language
    assert "release 1" in text["overview"] and "release 2" in text["overview"]
    assert "1.4900" in text["overview"] and "1.6200" in text["overview"]
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.count("<path") > 3 and ">v2<" not in svg.text  # SVG text is drawn as glyph paths
    # the lineage: v3 under review by a pseudonym, v2 rejected and v1 accepted by name; bo's lease
    lineage = text["adapter"]
    assert re.search(r"v3 pending continues v1 " + re.escape(ann), lineage), lineage
    assert re.search(r"v2 rejected continues v1 bo", lineage) and re.search(r"v1 accepted ann", lineage)
    assert bo in lineage and "holds the lease from v1" in lineage
    assert bo in text["adapters"] and "translate" in text["adapters"] and "Hindi" in text["adapters"]
    # the queue: single-blind until decided
    assert ann in text["queue"] and "pending" not in text["queue"]
    assert re.search(r"v3 " + re.escape(ann) + r" .*queued", text["queue"])
    assert re.search(r"v1 ann .*accepted", text["queue"]) and re.search(r"v2 bo .*rejected", text["queue"])
    # credits count decided, accepted work only: ann's v1 (184 examples), not her pending v3
    assert re.search(r"ann 1 184 Hindi", text["contributors"]) and " bo " not in text["contributors"]
    # data per language: Hindi has the adapter, one accepted version by one donor, newest bpb 1.49
    assert re.search(r"Hindi hi Devanagari 1 1 1 184 1\.4900", text["data"]), text["data"]
    assert re.search(r"Tamil ta Tamil 0 0 0 0 1\.6000", text["data"])


# --- in a browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does) to run the browser tests")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: FEDEM_SCREENSHOTS (docs/dashboard/ via `make screenshots`), else tmp."""
    return Path(os.environ.get("FEDEM_SCREENSHOTS", tmp_path / "shots"))


@pytest.mark.parametrize("screen", list(SCREENS))
def test_each_page_in_headless_chromium(community: Hub, browser: Any, shots: Path, screen: str) -> None:
    page = browser.new_page(viewport=SCREENS[screen])
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    shots.mkdir(parents=True, exist_ok=True)
    for name, path in PAGES.items():
        assert page.goto(community.url + path).status == 200
        # readable on a phone: nothing wider than the screen but the tables' own scroll boxes
        assert page.evaluate("document.documentElement.scrollWidth") <= SCREENS[screen]["width"], name
        page.screenshot(path=str(shots / f"{name}-{screen}.png"), full_page=True)
        assert (shots / f"{name}-{screen}.png").stat().st_size > 5_000
    assert not errors, errors

    # the script ran: the lease shows as a countdown, times in the reader's zone
    page.goto(community.url + PAGES["adapter"])
    assert re.fullmatch(
        r"ends in 2 h 59 min|ends in 3 h 0 min", page.locator("time[data-countdown]").first.inner_text()
    )
    assert "UTC" not in page.locator("ol.lineage time").first.inner_text()
    # the maturity plot loaded as an image; the navigation works by clicking
    page.goto(community.url + PAGES["overview"])
    assert page.locator(".plot img").evaluate("img => img.naturalWidth") > 0
    page.get_by_role("link", name="contributors").click()
    page.wait_for_url("**/dashboard/contributors")
    assert page.locator("td strong").first.inner_text() == "ann"
    page.close()
