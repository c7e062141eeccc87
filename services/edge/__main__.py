"""`python -m services.edge`: run the edge service alone."""

from services.cli import serve_one

raise SystemExit(serve_one("edge"))
