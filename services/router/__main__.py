"""`python -m services.router`: run the router service alone."""

from services.kit.entry import run
from services.router.app import ENTRY

raise SystemExit(run([ENTRY]))
