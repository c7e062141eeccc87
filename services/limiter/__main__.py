"""`python -m services.limiter`: run the limiter service alone."""

from services.kit.entry import run
from services.limiter.app import ENTRY

raise SystemExit(run([ENTRY]))
