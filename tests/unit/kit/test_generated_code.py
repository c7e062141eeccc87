"""The committed gen/ must match protos/, and the check must catch a proto changed without regeneration."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True, timeout=120
    )


def test_committed_generated_code_is_fresh() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_a_proto_changes_without_regeneration(tmp_path: Path) -> None:
    protos, gen = tmp_path / "protos", tmp_path / "gen"
    shutil.copytree(ROOT / "protos", protos)
    shutil.copytree(ROOT / "gen", gen, ignore=shutil.ignore_patterns("__pycache__"))
    proto = protos / "ballast" / "limiter" / "v1" / "limiter.proto"
    proto.write_text(
        proto.read_text().replace("message GetUsageRequest {", "message GetUsageRequest {\n  bool x = 99;")
    )
    result = _check("--protos", str(protos), "--gen", str(gen))
    assert result.returncode == 1
    assert "stale: gen/ballast/limiter/v1/limiter_pb2.py" in result.stdout


def test_check_fails_when_generated_code_is_hand_edited(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    shutil.copytree(ROOT / "gen", gen, ignore=shutil.ignore_patterns("__pycache__"))
    stub = gen / "ballast" / "edge" / "v1" / "edge_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# edited\n")
    result = _check("--gen", str(gen))
    assert result.returncode == 1
    assert "stale: gen/ballast/edge/v1/edge_pb2.pyi" in result.stdout
