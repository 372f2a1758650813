"""``GET /``: the playground, one self-contained page (inline script and style, no build step) that
uses the public API only (GET /models, POST /generate streamed). Its Content-Security-Policy lets it
load nothing from anywhere but the service itself."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def page() -> str:
    return files("service.api").joinpath("playground.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def playground() -> HTMLResponse:
    """The playground: type a prompt, watch the previews stream in, copy the equivalent curl command."""
    return HTMLResponse(page(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
