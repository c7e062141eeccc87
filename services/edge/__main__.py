"""`python -m services.edge`: run the edge service alone."""

from services.edge.app import ENTRY
from services.kit.entry import run

raise SystemExit(run([ENTRY]))
