"""Where a running suite's edge serves its OpenAI-compatible HTTP face."""

from __future__ import annotations

from services.edge.app import EdgeApp
from services.testing import Suite


def http_url(suite: Suite) -> str:
    """The base URL an OpenAI SDK takes (`base_url`), ending in /v1."""
    app = suite.running["edge"].app
    assert isinstance(app, EdgeApp) and app.http.port, "the edge's HTTP face is not running"
    return f"http://127.0.0.1:{app.http.port}/v1"
