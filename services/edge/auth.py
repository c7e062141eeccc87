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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from services.kit.errors import PermissionDenied, Unauthenticated
from services.kit.yamlfile import YamlFileError, YamlReader, compose, read_text

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
    cannot be read or is invalid yields none here; the app reports it at start-up (read_keys_file)."""
    try:
        keys = read_keys_file(path).keys
    except KeysFileError:
        return []
    return [key.key_id for key in keys if key.sha256 in DEMO_KEY_HASHES]


class KeysFileError(YamlFileError):
    """The keys file is malformed; each problem names the file, the line and the entry."""


# A tenant's own webhook secret: shorter ones are guessable.
MIN_WEBHOOK_SECRET_CHARS = 16
_KEY_FIELDS = ("key_id", "sha256", "tenant", "user", "tier")


@dataclass(frozen=True)
class KeysFile:
    """What the keys file says: the operators' static keys, and per-tenant settings."""

    keys: tuple[ApiKey, ...] = ()
    # tenant -> the secret its webhooks are signed with (`tenants.<id>.webhook_secret[_file]`).
    webhook_secrets: Mapping[str, str] = field(default_factory=dict)


def read_keys_file(path: str | Path) -> KeysFile:
    """The one reading of the keys file (`keys:` and `tenants:`), every problem at its line.
    No path or a missing file means no keys and no tenant settings."""
    if not str(path) or not Path(path).exists():  # Path("") would be the working directory
        return KeysFile()
    source = str(path)
    try:
        document = compose(read_text(path, "keys file"), source)
    except YamlFileError as exc:
        raise KeysFileError(exc.problems) from exc
    r = YamlReader(source)
    root = r.entries(document, "keys file")
    r.unknown(root, {"keys", "tenants"}, "keys file")
    keys = _file_keys(r, root["keys"][1]) if "keys" in root else []
    secrets: dict[str, str] = {}
    tenants = r.entries(root["tenants"][1], "tenants") if "tenants" in root else {}
    for tenant, (_, node) in tenants.items():
        secret = _webhook_secret(r, node, f"tenants.{tenant}")
        if secret is not None:
            secrets[tenant] = secret
    if r.problems:
        raise KeysFileError(r.problems)
    return KeysFile(tuple(keys), secrets)


def _file_keys(r: YamlReader, node: yaml.Node) -> list[ApiKey]:
    if not isinstance(node, yaml.SequenceNode):
        r.bad(node, "keys: expected a mapping with a `keys:` list")
        return []
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for index, item in enumerate(node.value):
        key = _file_key(r, item, f"keys[{index}]")
        if key is None:
            continue
        if key.key_id in seen:
            r.bad(item, f"keys[{index}]: duplicate key_id {key.key_id!r}")
            continue
        seen.add(key.key_id)
        keys.append(key)
    return keys


def _file_key(r: YamlReader, node: yaml.Node, what: str) -> ApiKey | None:
    items = r.mapping(node, what)
    if items is None:
        return None
    r.unknown(items, {*_KEY_FIELDS, "region"}, what)
    values = {
        name: r.scalar(items[name][1], f"{what}.{name}") for name in items if name in (*_KEY_FIELDS, "region")
    }
    missing = [name for name in _KEY_FIELDS if not values.get(name)]
    if missing:
        r.bad(node, f"{what}: missing {', '.join(missing)}")
        return None
    digest = str(values["sha256"]).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        r.bad(items["sha256"][1], f"{what}: sha256 must be 64 hex digits (the SHA-256 of the key)")
        return None
    return ApiKey(
        key_id=str(values["key_id"]),
        sha256=digest,
        tenant_id=str(values["tenant"]),
        user_id=str(values["user"]),
        tier=str(values["tier"]),
        region=str(values.get("region") or ""),
    )


def _webhook_secret(r: YamlReader, node: yaml.Node, what: str) -> str | None:
    """The tenant's secret, inline or from a mounted file; None when it has none of its own."""
    items = r.entries(node, what)
    r.unknown(items, {"webhook_secret", "webhook_secret_file"}, what)
    if "webhook_secret" in items and "webhook_secret_file" in items:
        r.bad(node, f"{what}: set webhook_secret or webhook_secret_file, not both")
        return None
    if "webhook_secret_file" in items:
        secret_node = items["webhook_secret_file"][1]
        secret_file = r.string(items, "webhook_secret_file", what)
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as exc:
            r.bad(secret_node, f"{what}.webhook_secret_file: {exc.strerror or exc}")
            return None
    elif "webhook_secret" in items:
        secret_node = items["webhook_secret"][1]
        secret = r.scalar(secret_node, f"{what}.webhook_secret")
    else:
        return None
    if not isinstance(secret, str) or len(secret) < MIN_WEBHOOK_SECRET_CHARS:
        r.bad(
            secret_node,
            f"{what}: the webhook secret must be a string of at least {MIN_WEBHOOK_SECRET_CHARS} characters",
        )
        return None
    return secret


def load_keys_file(path: str | Path) -> list[ApiKey]:
    """The keys file's `keys:` entries (key_id, sha256, tenant, user, tier, region). No path or a
    missing file means no keys."""
    return list(read_keys_file(path).keys)


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
