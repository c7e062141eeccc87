"""Two builds of the local embedder side by side: memory, speed and agreement.

Run: .venv/bin/python -m bench.cache_embedder [--rounds 3] [--timed 300] [--compare int8|skipln|calibrated]
`--compare int8` (the default): the model as shipped (int8 weights folded to float32) against
the int8-weights rewrite (services/cache/int8_weights.py); writes
bench/results/cache_embedder.{md,json}. `--compare skipln`: the int8-weights model with
onnxruntime's SkipLayerNormalization fusion (its default) against it without (as the embedder
loads it); writes bench/results/cache_embedder_skipln.{md,json}. `--compare calibrated`: the
model as shipped, the int8-weights model with every MatMul on the per-block kernel, and with the
calibrated per-tensor kernel (services/cache/smoothing.py, the default), each int8 variant
compared with the shipped one; writes bench/results/cache_embedder_calibrated.{md,json}.

Each variant loads in its own process (so none sees another's memory), the variants
alternating for --rounds rounds. Per process: RSS (VmRSS) with the libraries imported, after
the model has loaded, after 1,000 single-text queries and after embedding every text of the
evaluation sets one by one (STS-B development and held-out, the project set); median
ms/query, 1 thread, batch 1, for a 16- and a 64-token text. Agreement: cosine between the two
variants' vectors of every evaluation text and of 120 long texts (min, median), and how the cosine of every
evaluation pair moves (the number the cache compares with its threshold), with the pairs that
cross 0.92 or 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Per comparison: variant name -> (int8 weights, SkipLayerNormalization fused, calibrated
# per-tensor int8 kernel[, its weights' largest magnitude when not chosen by the CPU]), the
# reference first; every other variant is compared with it.
COMPARISONS: dict[str, dict[str, tuple[bool | int, ...]]] = {
    "int8": {"shipped (folded to float32)": (False, False, False), "int8 weights": (True, False, False)},
    "skipln": {"int8, SkipLayerNorm fused": (True, True, False), "int8, unfused": (True, False, False)},
    "calibrated": {
        "shipped (folded to float32)": (False, False, False),
        "int8, per block": (True, False, False),
        "int8, calibrated per tensor": (True, False, True),
    },
    # For a CPU without an int8 dot product (AVX2 only): the calibrated per-tensor kernel with
    # 7-bit weights, whose 16-bit pair sums cannot saturate.
    "seven_bit": {
        "shipped (folded to float32)": (False, False, False),
        "int8, per block": (True, False, False),
        "calibrated per tensor, 7-bit weights": (True, False, True, 63),
    },
}
TITLES = {
    "int8": "shipped vs int8 weights",
    "skipln": "SkipLayerNormalization fused vs unfused",
    "calibrated": "int8 per-block kernel vs the calibrated per-tensor one, both against the model as shipped",
    "seven_bit": "int8 per-block kernel vs the calibrated per-tensor one with 7-bit weights, both against the model as shipped",
}
OUTPUTS = {
    "int8": "cache_embedder",
    "skipln": "cache_embedder_skipln",
    "calibrated": "cache_embedder_calibrated",
    "seven_bit": "cache_embedder_seven_bit",
}
THRESHOLDS = (0.92, 0.95)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def eval_pairs() -> tuple[list[str], list[tuple[str, str]]]:
    """Every text and pair of bench/cache_eval.py's sets (STS-B both splits, project set)."""
    from bench.cache_eval import DATA, STS_SPLITS, load_sts

    pairs = [(p["a"], p["b"]) for split in STS_SPLITS for p in load_sts(split)]
    for line in DATA.read_text().splitlines():
        if line.strip():
            p = json.loads(line)
            pairs.append((p["a"], p["b"]))
    return sorted({t for pair in pairs for t in pair}), pairs


LONG_TEXTS = 120


def long_texts() -> list[str]:
    """LONG_TEXTS texts of 30-230 tokens, each 4-15 sentences of STS-B's held-out file joined
    (a fixed seed): a per-tensor kernel quantises a whole text's activations with one scale, so
    agreement on one-sentence texts does not speak for long turns."""
    from bench.cache_eval import load_sts

    sentences = [p["a"] for p in load_sts("held-out")]
    rng = np.random.default_rng(7)
    return [
        " ".join(rng.choice(sentences, size=int(rng.integers(4, 16)), replace=False))
        for _ in range(LONG_TEXTS)
    ]


def child(
    int8: bool, fuse: bool, calibrated: bool, timed: int, vectors_out: str, weight_limit: int | None = None
) -> dict[str, Any]:
    """One variant in this process."""
    import onnxruntime  # noqa: F401  (imported before the baseline: only the model counts)
    import tokenizers  # noqa: F401

    from services.cache.embedder import MiniLMModel

    texts, _ = eval_pairs()
    base = _rss_mb()
    model = MiniLMModel(
        int8_weights=int8,
        fuse_skip_layer_norm=fuse,
        calibrated_int8=calibrated,
        per_tensor_weight_limit=weight_limit,
    )
    loaded = _rss_mb()
    vectors = []
    after_1000 = 0.0
    for i, text in enumerate(texts, 1):
        vectors.append(model.encode([text])[0])
        if i == 1000:
            after_1000 = _rss_mb()
    after_all = _rss_mb()
    np.save(vectors_out, np.array(vectors, dtype=np.float32))
    np.save(vectors_out + ".long.npy", np.vstack([model.encode([text]) for text in long_texts()]))
    words = ("the cache answers repeated questions quickly and safely " * 20).split()
    ms = {}
    for tokens in (16, 64):
        text = " ".join(words[: tokens - 2])  # [CLS] and [SEP] make up the rest
        assert len(model._tokenizer.encode(text).ids) == tokens
        for _ in range(20):
            model.encode([text])
        times = []
        for _ in range(timed):
            started = time.perf_counter()
            model.encode([text])
            times.append(time.perf_counter() - started)
        ms[tokens] = statistics.median(times) * 1000
    return {
        "rss_base_mb": round(base, 1),
        "rss_loaded_mb": round(loaded, 1),
        "model_mb": round(loaded - base, 1),
        "rss_after_1000_mb": round(after_1000, 1),
        f"rss_after_{len(texts)}_mb": round(after_all, 1),
        "ms_16_tokens": round(ms[16], 2),
        "ms_64_tokens": round(ms[64], 2),
        "load_seconds": round(model.load_seconds, 3),
        "int8_tensors": model.int8_tensors,
        "per_tensor_matmuls": model.per_tensor_matmuls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timed", type=int, default=300, help="timed queries per length")
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="int8")
    parser.add_argument(
        "--output", default=None, help="name of the results files under bench/results (default per --compare)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        flags = args.child.split(",")
        int8, fuse, calibrated = (flag == "1" for flag in flags[:3])
        limit = int(flags[3]) if len(flags) > 3 else None
        print(json.dumps(child(int8, fuse, calibrated, args.timed, args.vectors, limit)))
        return
    # Imported here, not at the top: the measuring children would count its imports (gRPC).
    from bench.support import cpu_description

    variants = COMPARISONS[args.compare]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    vectors: dict[str, np.ndarray] = {}
    long_vectors: dict[str, np.ndarray] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, flags_of in variants.items():
                flags = ",".join(str(int(flag)) for flag in flags_of)
                out = str(Path(tmp, f"{flags}.npy"))
                command = [sys.executable, "-m", "bench.cache_embedder", "--child", flags]
                command += ["--timed", str(args.timed), "--vectors", out]
                done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
                line = done.stdout.strip().splitlines()[-1]
                runs[name].append(json.loads(line))
                vectors[name] = np.load(out)
                long_vectors[name] = np.load(out + ".long.npy")
    load_after = os.getloadavg()
    texts, pairs = eval_pairs()
    index = {t: i for i, t in enumerate(texts)}
    a = np.array([index[x] for x, _ in pairs])
    b = np.array([index[y] for _, y in pairs])
    names = list(variants)
    old_name = names[0]
    old = vectors[old_name]
    old_pairs = (old[a] * old[b]).sum(axis=1)
    agreements: dict[str, Any] = {}
    for new_name in names[1:]:
        new = vectors[new_name]
        agreement = (old * new).sum(axis=1)
        new_pairs = (new[a] * new[b]).sum(axis=1)
        moved = new_pairs - old_pairs
        long_agreement = (long_vectors[old_name] * long_vectors[new_name]).sum(axis=1)
        agreements[new_name] = {
            "vector_cosine": {"min": float(agreement.min()), "median": float(np.median(agreement))},
            "long_text_cosine": {
                "min": float(long_agreement.min()),
                "median": float(np.median(long_agreement)),
            },
            "pair_cosine_change": {
                "mean": float(moved.mean()),
                "median_abs": float(np.median(np.abs(moved))),
                "p99_abs": float(np.percentile(np.abs(moved), 99)),
                "max_abs": float(np.abs(moved).max()),
            },
            "pairs_crossing_threshold": {
                f"{t:.2f}": int(((old_pairs >= t) != (new_pairs >= t)).sum()) for t in THRESHOLDS
            },
            "of_which_now_above": {
                f"{t:.2f}": int(((old_pairs < t) & (new_pairs >= t)).sum()) for t in THRESHOLDS
            },
        }
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cpu": cpu_description(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "rounds": args.rounds,
        "runs": runs,
        "texts": len(texts),
        "pairs": len(pairs),
        # Against the first variant; with two variants, also at the top level as before.
        "against": old_name,
        "agreement": agreements,
        **(agreements[names[1]] if len(names) == 2 else {}),
    }
    keys = [k for k in runs[old_name][0] if k not in ("int8_tensors", "per_tensor_matmuls")]
    md = [
        f"# Local embedder: {TITLES[args.compare]} (bench/cache_embedder.py)",
        "",
        f"{report['machine']}, {report['cpu']}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; "
        f"{args.rounds} rounds, variants alternating, each in its own process; medians per round.",
        "",
        f"Command: `.venv/bin/python -m bench.cache_embedder --compare {args.compare} --rounds {args.rounds}"
        + (f" --output {args.output}`" if args.output else "`"),
        "",
        "| measure | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for key in [*keys, "per_tensor_matmuls"]:
        cells = [" / ".join(str(r.get(key, "")) for r in runs[name]) for name in variants]
        md.append(f"| {key} | " + " | ".join(cells) + " |")
    md.append("")
    for new_name, found in agreements.items():
        vector, pair = found["vector_cosine"], found["pair_cosine_change"]
        crossed, up = found["pairs_crossing_threshold"], found["of_which_now_above"]
        md += [
            f"Agreement of {new_name} with {old_name} on {len(texts)} evaluation texts: cosine between "
            f"the two variants' vectors min {vector['min']:.4f}, median {vector['median']:.5f}. Pair "
            f"cosine ({new_name} minus {old_name}) over {len(pairs)} evaluation pairs: mean "
            f"{pair['mean']:+.5f}, median |change| {pair['median_abs']:.5f}, p99 {pair['p99_abs']:.4f}, "
            f"max {pair['max_abs']:.4f}; pairs on the other side of a threshold: "
            + ", ".join(f"{t}: {crossed[t]} ({up[t]} now above)" for t in crossed)
            + f". On {LONG_TEXTS} long texts (4-15 held-out STS-B sentences each): cosine min "
            f"{found['long_text_cosine']['min']:.4f}, median {found['long_text_cosine']['median']:.5f}.",
            "",
        ]
    RESULTS.mkdir(exist_ok=True)
    output = args.output or OUTPUTS[args.compare]
    (RESULTS / f"{output}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{output}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
