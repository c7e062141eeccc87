"""API keys: stored only as SHA-256 hashes, mapped to tenant, user, tier and region.

Keys come from the keys file (operators' static keys) and from the edge store (keys made
through EdgeAdminService, shared by replicas). The secret itself exists only in the
caller's hands and in the one CreateApiKey response.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from services.kit.errors import PermissionDenied, Unauthenticated

KEY_PREFIX = "bk_"


@dataclass(frozen=True)
class ApiKey:
    """What a key stands for; never holds the secret."""

    key_id: str
    sha256: str
    tenant_id: str
    user_id: str
    tier: str
    region: str = ""
    created_at: float = 0.0
    revoked: bool = False


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key(tenant_id: str, user_id: str, tier: str, region: str = "") -> tuple[ApiKey, str]:
    secret = new_secret()
    key = ApiKey(
        key_id="key_" + secrets.token_hex(8),
        sha256=hash_key(secret),
        tenant_id=tenant_id,
        user_id=user_id,
        tier=tier,
        region=region,
        created_at=time.time(),
    )
    return key, secret


# The demo keys' secrets are published (README, config/edge_keys.yaml): anyone can use them, so
# an edge that others can reach must not accept them, whichever file they are copied into.
DEMO_SECRETS = ("bk_demo_free", "bk_demo_paid", "bk_demo_enterprise", "bk_demo_globex")
DEMO_KEY_HASHES = frozenset(hashlib.sha256(secret.encode()).hexdigest() for secret in DEMO_SECRETS)


def demo_keys_in(path: str | Path) -> list[str]:
    """key_ids of the entries in a keys file whose secret is a published demo key. A file that
    cannot be read or parsed yields none here; load_keys_file reports it at start-up."""
    try:
        data: Any = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    entries = data.get("keys") if isinstance(data, dict) else None
    return [
        str(entry.get("key_id") or f"keys[{index}]")
        for index, entry in enumerate(entries if isinstance(entries, list) else [])
        if isinstance(entry, dict) and str(entry.get("sha256", "")).lower() in DEMO_KEY_HASHES
    ]


class KeysFileError(ValueError):
    """The keys file is malformed; the message names the file and entry."""


def load_keys_file(path: str | Path) -> list[ApiKey]:
    """Reads `keys:` entries (key_id, sha256, tenant, user, tier, region). No path or a missing
    file means no keys."""
    if not str(path):
        return []
    file = Path(path)
    if not file.exists():
        return []
    data: Any = yaml.safe_load(file.read_text()) or {}
    entries = data.get("keys", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{file}: expected a mapping with a `keys:` list")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{file}: keys[{index}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected a mapping")
        missing = [f for f in ("key_id", "sha256", "tenant", "user", "tier") if not entry.get(f)]
        if missing:
            raise KeysFileError(f"{where}: missing {', '.join(missing)}")
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysFileError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the key)")
        if entry["key_id"] in seen:
            raise KeysFileError(f"{where}: duplicate key_id {entry['key_id']!r}")
        seen.add(str(entry["key_id"]))
        keys.append(
            ApiKey(
                key_id=str(entry["key_id"]),
                sha256=digest,
                tenant_id=str(entry["tenant"]),
                user_id=str(entry["user"]),
                tier=str(entry["tier"]),
                region=str(entry.get("region") or ""),
            )
        )
    return keys


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The API key from `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for name, value in metadata or ():
        if name not in ("authorization", "x-api-key") or not isinstance(value, str):
            continue  # only these two carry a key; other values (`*-bin` bytes) are not ours to decode
        text = value
        if name == "authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and text.strip():
            return text.strip()
    raise Unauthenticated(
        "missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>` metadata"
    )


def check_admin(metadata: Iterable[tuple[str, str | bytes]] | None, admin_key: str) -> None:
    if not admin_key:
        raise PermissionDenied("the admin API is disabled: set BALLAST_EDGE_ADMIN_KEY to enable it")
    for name, value in metadata or ():
        if name == "x-admin-key" and isinstance(value, str):
            text = value
            if hmac.compare_digest(text.strip().encode(), admin_key.encode()):
                return
            raise Unauthenticated("invalid admin key")
    raise Unauthenticated("missing admin key: send `x-admin-key` metadata")


def revoked(key: ApiKey) -> ApiKey:
    return replace(key, revoked=True)
