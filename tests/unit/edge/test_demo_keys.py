"""The demo keys (published secrets) load only when a keys file is named, and never on an edge
that listens beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from ballast.edge.v1 import edge_pb2

from services.edge import auth
from services.edge.config import EdgeSettings
from services.kit.config import ConfigError, Env
from tests.conftest import SuiteFactory

ROOT = Path(__file__).resolve().parents[3]
DEMO_FILE = ROOT / "config" / "edge_keys.yaml"


def _settings(environ: dict[str, str]) -> EdgeSettings:
    env = Env(environ)
    settings = EdgeSettings.from_env(env)
    env.check()
    return settings


async def test_without_a_keys_file_the_demo_keys_are_not_accepted(suite_factory: SuiteFactory) -> None:
    assert _settings({}).keys_file == ""
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_KEYS_FILE": ""})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetJob(
            edge_pb2.GetJobRequest(job_id="job_nope"), metadata=(("authorization", "Bearer bk_demo_paid"),)
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_named_keys_file_on_loopback_may_hold_them(suite_factory: SuiteFactory) -> None:
    assert _settings({"BALLAST_EDGE_KEYS_FILE": str(DEMO_FILE), "BALLAST_HOST": "127.0.0.1"})
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_KEYS_FILE": str(DEMO_FILE)})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetJob(
            edge_pb2.GetJobRequest(job_id="job_nope"), metadata=(("authorization", "Bearer bk_demo_paid"),)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated; there is no such job


def test_a_demo_key_on_a_public_edge_is_refused_wherever_it_was_copied(tmp_path: Path) -> None:
    # Renamed and moved to another file, it is still the published secret.
    copied = tmp_path / "keys.yaml"
    copied.write_text(
        "keys:\n"
        f"  - key_id: acme-ops\n    sha256: {auth.hash_key('bk_demo_enterprise')}\n"
        "    tenant: acme\n    user: ops\n    tier: enterprise\n"
        f"  - key_id: acme-alice\n    sha256: {auth.hash_key('bk_not_published')}\n"
        "    tenant: acme\n    user: alice\n    tier: paid\n"
    )
    for path, named in ((DEMO_FILE, "demo-free"), (copied, "acme-ops")):
        with pytest.raises(ConfigError) as info:
            _settings({"BALLAST_EDGE_KEYS_FILE": str(path), "BALLAST_HOST": "0.0.0.0"})
        assert "BALLAST_EDGE_KEYS_FILE" in str(info.value) and named in str(info.value)
        assert "acme-alice" not in str(info.value)
    own = tmp_path / "own.yaml"
    own.write_text(
        f"keys:\n  - key_id: acme-alice\n    sha256: {auth.hash_key('bk_not_published')}\n"
        "    tenant: acme\n    user: alice\n    tier: paid\n"
    )
    assert _settings({"BALLAST_EDGE_KEYS_FILE": str(own), "BALLAST_HOST": "0.0.0.0"}).keys_file == str(own)


def test_ballast_serve_edge_on_0000_with_the_demo_keys_exits_naming_them() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BALLAST_")}
    environ.update(
        {
            "BALLAST_HOST": "0.0.0.0",
            "BALLAST_EDGE_KEYS_FILE": str(DEMO_FILE),
            "BALLAST_EDGE_PORT": "0",
            "BALLAST_METRICS": "false",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "edge"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "demo keys" in done.stderr and "BALLAST_EDGE_KEYS_FILE" in done.stderr
