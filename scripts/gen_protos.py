"""Regenerates gen/ from protos/: Python modules, gRPC stubs and type stubs.

Run `make protos` (or `python scripts/gen_protos.py`). `--check` generates into a
temporary folder and fails when the committed gen/ differs (stale or hand-edited).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def _proto_files(protos: Path) -> list[Path]:
    return sorted(protos.rglob("*.proto"))


def _include_paths(protos: Path) -> list[str]:
    """protos/ first, then the well-known types bundled with grpc_tools and googleapis."""
    wkt = resources.files("grpc_tools") / "_proto"
    import google.rpc  # googleapis-common-protos ships the google/rpc/*.proto sources

    googleapis_root = Path(next(iter(google.rpc.__path__))).parent.parent
    return [str(protos), str(wkt), str(googleapis_root)]


def generate(out: Path, protos_dir: Path = PROTOS) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(protos_dir)) for p in _proto_files(protos_dir)]
    args = [
        "protoc",
        *[f"-I{p}" for p in _include_paths(protos_dir)],
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # protoc-gen-mypy is installed next to the interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Package markers so that `ballast.<svc>.v1` is importable and type-checkable.
    for directory in [p for p in out.rglob("*") if p.is_dir()] + [out / "ballast"]:
        if directory == out:
            continue
        (directory / "__init__.py").touch()
    (out / "ballast" / "py.typed").touch()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check(protos_dir: Path = PROTOS, gen_dir: Path = GEN) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh, protos_dir)
        want, have = _tree(fresh), _tree(gen_dir)
        problems = [f"missing from gen/: {p}" for p in sorted(want - have)]
        problems += [f"not generated from protos/: gen/{p}" for p in sorted(have - want)]
        problems += [
            f"stale: gen/{p}"
            for p in sorted(want & have)
            if not filecmp.cmp(fresh / p, gen_dir / p, shallow=False)
        ]
    if problems:
        print("gen/ is out of date with protos/; run `make protos`:", *problems, sep="\n  ")
        return 1
    print("gen/ matches protos/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    parser.add_argument("--protos", type=Path, default=PROTOS, help="proto source folder")
    parser.add_argument("--gen", type=Path, default=GEN, help="generated code folder")
    ns = parser.parse_args()
    if ns.check:
        return check(ns.protos, ns.gen)
    if ns.gen.exists():
        shutil.rmtree(ns.gen)
    generate(ns.gen, ns.protos)
    print(f"generated {len(_proto_files(ns.protos))} protos into {ns.gen}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
