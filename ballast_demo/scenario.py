"""The front-page surge as a workload model: who arrives when, what they ask, and what the
simulated providers do meanwhile. Everything is configurable, seeded and deterministic.

Users of each tier arrive on a ramp, then traffic is sustained; each runs multi-turn agent
sessions, some turns calling a tool; a share of questions repeat or paraphrase an FAQ (what a
cache can answer); the primary provider has RPM/TPM limits and a scripted outage mid-run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

TIERS = ("free", "paid", "enterprise")


@dataclass(frozen=True)
class ScenarioConfig:
    seed: int = 7
    # Timeline, seconds from the start of the load.
    duration_s: float = 60.0
    ramp_s: float = 20.0
    start_users: int = 10
    peak_users: int = 150
    # Share of users per tier (free, paid, enterprise).
    tier_mix: tuple[float, float, float] = (0.6, 0.3, 0.1)
    # Each session: this many turns, with think time between them.
    turns: tuple[int, int] = (2, 5)
    think_s: tuple[float, float] = (1.0, 3.0)
    # A turn asks the weather tool with this probability (the simulated model then calls it).
    tool_share: float = 0.2
    # A turn repeats an FAQ question verbatim or paraphrased with these probabilities.
    repeat_share: float = 0.25
    paraphrase_share: float = 0.1
    # Free users queue their turns (SubmitChat) instead of waiting on Chat.
    free_uses_queue: bool = True
    # The primary provider: its limits, and an outage from outage_start_s for outage_s seconds.
    primary_rpm: int = 900
    primary_tpm: int = 1_500_000
    secondary_rpm: int = 3000
    secondary_tpm: int = 6_000_000
    primary_latency_ms: float = 150.0
    secondary_latency_ms: float = 300.0
    tokens_per_second: float = 400.0
    outage_start_s: float = 25.0
    outage_s: float = 15.0
    outage_mode: str = "error"
    # Tier limits, compressed to the run's time scale (the real tiers are per hour).
    window: str = "1m"
    free_requests: int = 8
    paid_requests: int = 120
    # Per-request deadline of the simulated agents.
    deadline_s: float = 30.0
    # Ports the simulated providers listen on (fixed, so the scenario can script faults).
    primary_port: int = 0
    secondary_port: int = 0

    def with_ports(self, primary: int, secondary: int) -> ScenarioConfig:
        return replace(self, primary_port=primary, secondary_port=secondary)

    def stretched(self, duration_s: float) -> ScenarioConfig:
        """The same run over `duration_s`: the ramp and the outage keep their share of it."""
        scale = duration_s / self.duration_s
        return replace(
            self,
            duration_s=duration_s,
            ramp_s=self.ramp_s * scale,
            outage_start_s=self.outage_start_s * scale,
            outage_s=self.outage_s * scale,
        )

    def users_at(self, t: float) -> int:
        """Concurrent users the ramp asks for at time t."""
        if t >= self.ramp_s:
            return self.peak_users
        return round(self.start_users + (self.peak_users - self.start_users) * t / self.ramp_s)


def demo() -> ScenarioConfig:
    """About a minute on one machine: 10 → 150 users, the primary down from 25 s to 40 s."""
    return ScenarioConfig()


def full() -> ScenarioConfig:
    """The benchmark: 10 → 1,000 users over a minute, then sustained; the outage mid-way."""
    return ScenarioConfig(
        duration_s=150.0,
        ramp_s=60.0,
        peak_users=1000,
        think_s=(3.0, 8.0),
        outage_start_s=75.0,
        outage_s=30.0,
        primary_rpm=3000,
        primary_tpm=4_000_000,
        secondary_rpm=6000,
        secondary_tpm=8_000_000,
    )


FAQ: list[tuple[str, list[str]]] = [
    ("How do I reset my password?", ["How can I reset my password?", "What's the way to reset my password?"]),
    ("What are your opening hours?", ["When are you open?", "What hours are you open?"]),
    (
        "How do I cancel my subscription?",
        ["How can I cancel my subscription?", "I want to cancel my subscription, how?"],
    ),
    ("Do you ship to Canada?", ["Can you ship to Canada?", "Is shipping to Canada available?"]),
    ("How do I export my data?", ["How can I export my data?", "What is the way to export my data?"]),
    ("What payment methods do you accept?", ["Which payment methods do you accept?", "How can I pay?"]),
    ("How do I contact support?", ["How can I reach support?", "What is the best way to contact support?"]),
    ("Is there a free trial?", ["Do you offer a free trial?", "Can I try it for free?"]),
]

TOPICS = [
    "my invoice", "the API rate limits", "a failing deployment", "the mobile app", "team permissions",
    "webhooks", "the search feature", "data retention", "single sign-on", "the billing page",
]  # fmt: skip


@dataclass
class Turn:
    text: str
    kind: str  # faq | paraphrase | unique | tool
    tool: bool = False


@dataclass
class UserPlan:
    """One simulated user: tier, arrival time, and the sessions they will run."""

    index: int
    tier: str
    arrive_s: float
    sessions: list[list[Turn]] = field(default_factory=list)
    think: list[float] = field(default_factory=list)


def plan_users(config: ScenarioConfig) -> list[UserPlan]:
    """Deterministic plan: arrivals follow the ramp, each user's turns are drawn from the seed."""
    rng = random.Random(config.seed)
    users: list[UserPlan] = []
    arrivals: list[float] = [0.0] * config.start_users
    # Spread the ramp's new users evenly over it.
    extra = config.peak_users - config.start_users
    arrivals += [config.ramp_s * (i + 1) / max(1, extra) for i in range(extra)]
    for index, arrive in enumerate(arrivals):
        tier = rng.choices(TIERS, weights=config.tier_mix)[0]
        user = UserPlan(index=index, tier=tier, arrive_s=arrive)
        # Enough sessions to stay busy until the end of the run.
        budget = config.duration_s - arrive
        while budget > 0:
            turns = []
            for _ in range(rng.randint(*config.turns)):
                turns.append(_turn(rng, config, index))
                pause = rng.uniform(*config.think_s)
                user.think.append(pause)
                budget -= pause + 0.2
            user.sessions.append(turns)
        users.append(user)
    return users


def _turn(rng: random.Random, config: ScenarioConfig, user: int) -> Turn:
    roll = rng.random()
    if roll < config.repeat_share:
        return Turn(rng.choice(FAQ)[0], "faq")
    if roll < config.repeat_share + config.paraphrase_share:
        return Turn(rng.choice(rng.choice(FAQ)[1]), "paraphrase")
    if roll < config.repeat_share + config.paraphrase_share + config.tool_share:
        city = rng.choice(["Paris", "Lagos", "Osaka", "Lima", "Oslo"])
        return Turn(f"Should I pack an umbrella for {city}? Use get_weather.", "tool", tool=True)
    topic = rng.choice(TOPICS)
    return Turn(f"User {user} asks about {topic}: detail {rng.randint(0, 10**6)}", "unique")


def write_suite_config(folder: Path, config: ScenarioConfig, root: Path) -> dict[str, str]:
    """A catalog (two SIMULATED providers, the primary with limits and an outage) and tiers for the run."""
    catalog: dict[str, Any] = yaml.safe_load((root / "config" / "router_catalog.yaml").read_text())
    primary = catalog["providers"]["sim-primary"]["sim"]
    primary.update(
        {
            "latency": {"distribution": "lognormal", "median_ms": config.primary_latency_ms,
                        "p99_ms": config.primary_latency_ms * 4},
            "tokens_per_second": config.tokens_per_second,
            "rpm": config.primary_rpm,
            "tpm": config.primary_tpm,
            "port": config.primary_port,
            "outages": [],
        }
    )  # fmt: skip
    secondary = catalog["providers"]["sim-secondary"]["sim"]
    secondary.update(
        {
            "latency": {"distribution": "lognormal", "median_ms": config.secondary_latency_ms,
                        "p99_ms": config.secondary_latency_ms * 4},
            "tokens_per_second": config.tokens_per_second,
            "rpm": config.secondary_rpm,
            "tpm": config.secondary_tpm,
            "port": config.secondary_port,
        }
    )  # fmt: skip
    # The primary first, the secondary as the failover, for every alias the tiers use.
    for alias in ("fast", "budget", "reasoning"):
        catalog["aliases"][alias]["strategy"] = "ordered"
    catalog["aliases"]["fast"]["candidates"] = ["sim-small", "sim-small-eu"]
    catalog["aliases"]["budget"]["candidates"] = ["sim-small", "sim-small-eu"]
    catalog["aliases"]["reasoning"]["candidates"] = ["sim-large", "sim-large-eu"]
    (folder / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    tiers: dict[str, Any] = yaml.safe_load((root / "config" / "limiter_tiers.yaml").read_text())
    tiers["tiers"]["free"]["requests"] = {"limit": config.free_requests, "window": config.window}
    tiers["tiers"]["paid"]["requests"] = {"limit": config.paid_requests, "window": config.window}
    (folder / "tiers.yaml").write_text(yaml.safe_dump(tiers, sort_keys=False))
    return {
        "BALLAST_ROUTER_CATALOG_FILE": str(folder / "catalog.yaml"),
        "BALLAST_LIMITER_TIERS_FILE": str(folder / "tiers.yaml"),
    }
