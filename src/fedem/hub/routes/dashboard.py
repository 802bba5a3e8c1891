"""The community dashboard: HTML pages at `/dashboard/…`, readable without a token, and the maturity
plot as SVG. Each route reads one view (`fedem.hub.dashboard.views`) and renders one template; none is
part of the API schema. docs/dashboard.md shows every page."""

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fedem import __version__
from fedem.hub.auth import SessionDep
from fedem.hub.dashboard import views
from fedem.hub.dashboard.plots import maturity_svg
from fedem.hub.errors import HubError
from fedem.languages import LANGUAGES

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "dashboard" / "templates")
templates.env.globals.update(version=__version__, languages=LANGUAGES)
PAGES = (("overview", "/dashboard"), ("adapters", "/dashboard/adapters"), ("queue", "/dashboard/queue"),
         ("contributors", "/dashboard/contributors"), ("data", "/dashboard/data"))  # fmt: skip


def _page(request: Request, template: str, page: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"page": page, "pages": PAGES, **context})


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard", response_class=HTMLResponse)
def overview(request: Request, session: SessionDep) -> HTMLResponse:
    releases = views.releases(session)
    adapters = views.adapters(session)
    queue = views.queue(session, limit=10)
    return _page(
        request,
        "overview.html",
        "overview",
        releases=releases,
        adapters=adapters,
        queue=queue,
        waiting=sum(row.state in ("queued", "running") for row in queue),
        contributors=len(views.credits(session)),
    )


@router.get("/dashboard/maturity/{namespace}/{name}.svg")
def maturity(namespace: str, name: str, session: SessionDep) -> Response:
    repo = f"{namespace}/{name}"
    releases = views.releases(session)
    if repo not in releases:
        raise HubError(404, "repo_not_found", f"no model repo {repo!r}")
    return Response(maturity_svg(repo, releases[repo]), media_type="image/svg+xml")


@router.get("/dashboard/adapters", response_class=HTMLResponse)
def adapters(request: Request, session: SessionDep) -> HTMLResponse:
    return _page(request, "adapters.html", "adapters", adapters=views.adapters(session))


@router.get("/dashboard/adapters/{namespace}/{name}", response_class=HTMLResponse)
def adapter(namespace: str, name: str, request: Request, session: SessionDep) -> HTMLResponse:
    repo = f"{namespace}/{name}"
    found = views.adapters(session, repo)
    if not found:
        raise HubError(404, "repo_not_found", f"no adapter {repo!r}")
    return _page(request, "adapter.html", "adapters", adapter=found[0])


@router.get("/dashboard/queue", response_class=HTMLResponse)
def queue(request: Request, session: SessionDep) -> HTMLResponse:
    return _page(request, "queue.html", "queue", queue=views.queue(session))


@router.get("/dashboard/contributors", response_class=HTMLResponse)
def contributors(request: Request, session: SessionDep) -> HTMLResponse:
    return _page(request, "contributors.html", "contributors", credits=views.credits(session))


@router.get("/dashboard/data", response_class=HTMLResponse)
def data(request: Request, session: SessionDep) -> HTMLResponse:
    stats = views.language_stats(session, views.releases(session))
    return _page(request, "data.html", "data", stats=stats)
