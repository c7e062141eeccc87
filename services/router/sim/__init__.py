"""The SIMULATED model provider: an HTTP server speaking the OpenAI and Anthropic wire formats.

Every answer it gives is labelled simulated. It serves the embedded demo, the benchmarks and
the fault tests, and doubles as the OpenAI/Anthropic test server.
"""

from services.router.sim.server import Fault, SimServer

__all__ = ["Fault", "SimServer"]
