"""`python -m services.sessions`: run the sessions service alone."""

from services.cli import serve_one

raise SystemExit(serve_one("sessions"))
