"""`python -m services.limiter`: run the limiter service alone."""

from services.cli import serve_one

raise SystemExit(serve_one("limiter"))
