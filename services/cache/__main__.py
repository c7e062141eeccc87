"""`python -m services.cache`: run the cache service alone."""

from services.cache.app import ENTRY
from services.kit.entry import run

raise SystemExit(run([ENTRY]))
