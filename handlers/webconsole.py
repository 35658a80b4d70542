"""The web console: the files in `handlers/console/`, served as they are.

The page is plain HTML, CSS and JavaScript modules: nothing to build, nothing
fetched from elsewhere. Its Content-Security-Policy lets it load only its own
files and talk only to this gateway, so no injected script or style can run.
`index.html` is served at `/`, everything else under `/console/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tornado.web import StaticFileHandler

from .base import HSTS, SECURITY_HEADERS, access_record

CONSOLE_DIRECTORY = str(Path(__file__).resolve().parent / "console")
CONSOLE_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)


class ConsoleFileHandler(StaticFileHandler):
    """A console file, with the security headers of every route and the console's CSP."""

    route = "console"

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Content-Security-Policy", CONSOLE_CSP)
        if self.request.protocol == "https":
            self.set_header("Strict-Transport-Security", HSTS)

    def set_extra_headers(self, path: str) -> None:
        # Revalidate on every load, so a deploy shows at once; the ETag keeps it cheap.
        self.set_header("Cache-Control", "no-cache")

    def access_record(self) -> dict[str, Any]:
        return access_record(self, self.route)


def console_routes() -> list[tuple[str, type[ConsoleFileHandler], dict[str, Any]]]:
    """The console's routes, for the application's route table."""
    return [
        (r"/()", ConsoleFileHandler, {"path": CONSOLE_DIRECTORY, "default_filename": "index.html"}),
        (r"/console/(.+)", ConsoleFileHandler, {"path": CONSOLE_DIRECTORY}),
    ]
