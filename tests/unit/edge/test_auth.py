"""API keys: hashes only, metadata forms, keys-file validation, the admin guard, and the admin API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from ballast.edge.v1 import edge_pb2

from services.edge import auth
from services.kit.errors import PermissionDenied, Unauthenticated
from tests.conftest import SuiteFactory

ROOT = Path(__file__).resolve().parents[3]


def test_keys_are_stored_as_sha256_only() -> None:
    key, secret = auth.new_key("acme", "alice", "free")
    assert secret.startswith("bk_") and len(secret) > 32
    assert key.sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(key)


@pytest.mark.parametrize(
    "metadata",
    [[("authorization", "Bearer bk_x")], [("authorization", "bearer   bk_x ")], [("x-api-key", "bk_x")]],
)
def test_key_from_metadata_forms(metadata: list[tuple[str, str | bytes]]) -> None:
    assert auth.key_from_metadata(metadata) == "bk_x"


@pytest.mark.parametrize("metadata", [[], [("authorization", "Basic abc")], [("authorization", "Bearer ")]])
def test_missing_key_is_unauthenticated(metadata: list[tuple[str, str | bytes]]) -> None:
    with pytest.raises(Unauthenticated, match="missing API key"):
        auth.key_from_metadata(metadata)


def test_shipped_keys_file_has_the_demo_keys() -> None:
    keys = {k.key_id: k for k in auth.load_keys_file(ROOT / "config" / "edge_keys.yaml")}
    assert keys["demo-free"].sha256 == auth.hash_key("bk_demo_free")
    assert keys["demo-free"].tier == "free"
    assert keys["demo-globex"].tenant_id == "globex"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: 3", "expected a mapping with a `keys:` list"),
        (
            "keys:\n  - key_id: a\n    sha256: zz\n    tenant: t\n    user: u\n    tier: free\n",
            "64 hex digits",
        ),
        ("keys:\n  - key_id: a\n    tenant: t\n", "keys[0]: missing sha256, user, tier"),
    ],
)
def test_bad_keys_file_names_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(auth.KeysFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        auth.load_keys_file(path)


def test_the_keys_file_is_read_once_with_every_problem_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    digest = auth.hash_key("bk_x")
    path.write_text(
        f"""\
keys:
  - {{key_id: a, sha256: {digest}, tenant: t, user: u, tier: free, regoin: eu}}
  - {{key_id: a, sha256: {digest}, tenant: t, user: v, tier: free}}
  - just a key
tenants:
  t: {{webhook_secret: whsec_tenant_t_inline}}
  u: {{webhook_secret: short, webhook_secret_file: /x}}
colour: red
"""
    )
    with pytest.raises(auth.KeysFileError) as info:
        auth.read_keys_file(path)
    assert info.value.problems == [
        f"{path}:8: keys file: unknown key 'colour' (allowed: keys, tenants)",
        f"{path}:2: keys[0]: unknown key 'regoin' (allowed: key_id, region, sha256, tenant, tier, user)",
        f"{path}:3: keys[1]: duplicate key_id 'a'",
        f"{path}:4: keys[2] must be a mapping",
        f"{path}:7: tenants.u: set webhook_secret or webhook_secret_file, not both",
    ]
    path.write_text(
        f"keys:\n  - {{key_id: a, sha256: {digest}, tenant: t, user: u, tier: free}}\n"
        "tenants:\n  t: {webhook_secret: whsec_tenant_t_inline}\n  v:\n"
    )
    both = auth.read_keys_file(path)
    assert [key.user_id for key in both.keys] == ["u"] and both.webhook_secrets == {
        "t": "whsec_tenant_t_inline"
    }
    assert auth.read_keys_file("") == auth.KeysFile() == auth.read_keys_file(tmp_path / "none.yaml")


def test_admin_guard() -> None:
    with pytest.raises(PermissionDenied, match="BALLAST_EDGE_ADMIN_KEY"):
        auth.check_admin([("x-admin-key", "x")], "")
    with pytest.raises(Unauthenticated, match="invalid admin key"):
        auth.check_admin([("x-admin-key", "wrong")], "right")
    with pytest.raises(Unauthenticated, match="missing admin key"):
        auth.check_admin([], "right")
    auth.check_admin([("x-admin-key", "right")], "right")


ADMIN = (("x-admin-key", "s3cret"),)


async def test_admin_api_creates_lists_and_revokes_keys(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_ADMIN_KEY": "s3cret"})
    created = await suite.edge_admin.CreateApiKey(
        edge_pb2.CreateApiKeyRequest(tenant_id="acme", user_id="alice", tier="paid"), metadata=ADMIN
    )
    assert created.api_key.startswith("bk_")
    assert created.key.tenant_id == "acme" and not created.key.revoked
    listed = await suite.edge_admin.ListApiKeys(edge_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=ADMIN)
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    # The new key authenticates (GetJob of an unknown job: NOT_FOUND, not UNAUTHENTICATED) ...
    caller = (("authorization", f"Bearer {created.api_key}"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id="job_nope"), metadata=caller)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # ... until it is revoked.
    revoked = await suite.edge_admin.RevokeApiKey(
        edge_pb2.RevokeApiKeyRequest(key_id=created.key.key_id), metadata=ADMIN
    )
    assert revoked.key.revoked
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id="job_nope"), metadata=caller)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_api_needs_the_admin_key(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_ADMIN_KEY": "s3cret"})
    request = edge_pb2.CreateApiKeyRequest(tenant_id="acme", user_id="alice", tier="paid")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge_admin.CreateApiKey(request, metadata=(("x-admin-key", "nope"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A tenant's own API key is not an admin key.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge_admin.CreateApiKey(request, metadata=(("authorization", "Bearer bk_demo_paid"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_api_validates_fields(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_ADMIN_KEY": "s3cret"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge_admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(tenant_id="", user_id="alice", tier="paid"), metadata=ADMIN
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id" in (info.value.details() or "")


async def test_unknown_or_missing_api_key_is_unauthenticated(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"])
    for metadata in ((), (("authorization", "Bearer bk_not_a_key"),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.edge.GetUsage(edge_pb2.GetUsageRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
