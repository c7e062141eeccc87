"""`python -m services.cache`: run the cache service alone."""

from services.cli import serve_one

raise SystemExit(serve_one("cache"))
