"""``GET /``: the web page, plain HTML, CSS and JavaScript kept as package files under
``api/static/`` (no build step, nothing fetched from elsewhere).

The page talks to the v1 routes with ``fetch`` only, so one strict policy covers it: everything
from this origin, thumbnails as ``blob:`` URLs (fetched with the API key when there is one), no
inline script or style.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_file

from common.errors import NotFound

page = Blueprint("page", __name__)

STATIC_DIR = Path(__file__).with_name("static")
# The only files served: a name outside this list is a 404, never a path into the package.
ASSETS = {
    "page.css": "text/css",
    "page.js": "text/javascript",
    "client.js": "text/javascript",
    "events.js": "text/javascript",
    "dom.js": "text/javascript",
    "stages.js": "text/javascript",
    "turns.js": "text/javascript",
    "icon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)


def _file(name: str, mimetype: str) -> Response:
    # no-cache: revalidated on each load (an ETag answers 304), so a new release shows at once.
    response = send_file(STATIC_DIR / name, mimetype=mimetype, max_age=0, conditional=True, etag=True)
    response.headers["Cache-Control"] = "no-cache"
    response.headers.pop("Content-Disposition", None)  # shown in the browser, never saved as a file
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@page.get("/")
def index() -> Response:
    response = _file("index.html", "text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@page.get("/assets/<name>")
def asset(name: str) -> Response:
    mimetype = ASSETS.get(name)
    if mimetype is None:
        raise NotFound(f"no asset {name!r}")
    return _file(name, mimetype)
