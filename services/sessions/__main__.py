"""`python -m services.sessions`: run the sessions service alone."""

from services.kit.entry import run
from services.sessions.app import ENTRY

raise SystemExit(run([ENTRY]))
