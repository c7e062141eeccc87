"""`python -m services.router`: run the router service alone."""

from services.cli import serve_one

raise SystemExit(serve_one("router"))
