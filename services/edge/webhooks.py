"""Webhooks that cannot reach inside: every URL is vetted before a job is accepted and again
before each delivery attempt, and the POST goes to the address that was vetted.

A URL is refused when it carries userinfo, spells an IPv4 address in a form other parsers
read differently (`2130706433`, `0177.0.0.1`, `127.1`, `0x7f.1`), or when its host resolves to
any address that is not public (loopback, private, link-local, CGNAT, multicast, unspecified,
reserved, documentation; IPv4-mapped and NAT64 IPv6 addresses are judged by the IPv4 address
inside). `BALLAST_EDGE_WEBHOOK_ALLOWED` opens named hosts and CIDRs on purpose.

The delivery connects to the vetted IP itself while sending the URL's host as `Host` and as
the TLS server name (the certificate is checked against it), so a name that resolves to a
public address when checked and to 127.0.0.1 a moment later (DNS rebinding) never reaches
127.0.0.1. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.edge.auth import read_keys_file
from services.kit.errors import InvalidArgument

log = logging.getLogger("ballast.edge.webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves a host name to its addresses (injected in tests to play DNS rebinding).
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

FIELD = "webhook_url"
MAX_URL_CHARS = 2048

# Spelled out rather than taken from `ipaddress.is_global`, whose lists change between Python
# versions; `is_global` is still consulted as a second opinion.
_BLOCKED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (shared address space)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata endpoints
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/8",  # unspecified, loopback, IPv4-compatible (IPv4-mapped is unwrapped before this)
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4: carries an arbitrary IPv4 address
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_-]{1,63})*$"
)


class WebhookRefused(InvalidArgument):
    """The URL may not be called; INVALID_ARGUMENT naming `webhook_url` when it comes from a caller."""

    def __init__(self, description: str) -> None:
        super().__init__(FIELD, description)


class WebhookUnresolved(WebhookRefused):
    """The host did not resolve (now): refused at submit, retried at delivery."""


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is one the public internet routes to (what a webhook may call)."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_public(inner)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return False
    return address.is_global and not any(address in net for net in _BLOCKED if net.version == address.version)


def _numeric_ipv4(host: str) -> int | None:
    """The value of a host that inet_aton (and browsers) would read as IPv4, else None.

    `127.1`, `0177.0.0.1`, `0x7f.0.0.1` and `2130706433` all mean 127.0.0.1 to the C library.
    """
    labels = host.split(".")
    if labels and labels[-1] == "":
        labels.pop()  # a trailing dot
    if not labels or len(labels) > 4 or not all(_NUMBER.match(label) for label in labels):
        return None
    values: list[int] = []
    for label in labels:
        if label[:2].lower() == "0x":
            values.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            try:
                values.append(int(label, 8))
            except ValueError:
                return None
        else:
            values.append(int(label))
    *front, last = values
    if any(v > 255 for v in front) or last >= 256 ** (5 - len(values)):
        return None
    # The leading labels are single bytes; the last one fills the remaining bytes.
    return sum(value << (8 * (3 - index)) for index, value in enumerate(front)) + last


@dataclass(frozen=True)
class Target:
    """A vetted URL: where to connect and what to say the host is."""

    url: str
    scheme: str
    host: str  # as written (lower case, no trailing dot); Host header and TLS server name
    port: int
    address: IPAddress
    path: str  # path and query, as written

    @property
    def connect_url(self) -> str:
        literal = f"[{self.address.compressed}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default else f"{shown}:{self.port}"


@dataclass(frozen=True)
class _Parsed:
    scheme: str
    host: str
    port: int
    path: str
    literal: IPAddress | None


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


class WebhookPolicy:
    """Which webhook URLs may be called, and the address to call each at."""

    def __init__(
        self,
        allowed: Iterable[str] = (),
        *,
        resolver: Resolver = system_resolver,
        resolve_timeout: float = 5.0,
    ) -> None:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in allowed:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        self._networks = tuple(networks)
        self._hosts = frozenset(hosts)
        self._resolve = resolver
        self._timeout = resolve_timeout

    def _allowed_address(self, address: IPAddress) -> bool:
        inner = embedded_ipv4(address)
        return any(address in net or (inner is not None and inner in net) for net in self._networks)

    def parse(self, url: str) -> _Parsed:
        """Checks the URL's form without any network access."""
        if len(url) > MAX_URL_CHARS:
            raise WebhookRefused(f"at most {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise WebhookRefused(f"is not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused("must be an absolute http:// or https:// URL")
        if "@" in parts.netloc:
            raise WebhookRefused("must not carry credentials (user:password@); sign with the webhook secret")
        if any(ord(c) < 0x21 or c in "\\" for c in url):
            raise WebhookRefused("must not contain spaces, control characters or backslashes")
        try:
            host = parts.hostname.rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            raise WebhookRefused(f"host {parts.hostname!r} is not a valid host name") from None
        literal: IPAddress | None = None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            numeric = _numeric_ipv4(host)
            if numeric is not None:
                shown = str(ipaddress.IPv4Address(numeric)) if numeric < 2**32 else "out of range"
                raise WebhookRefused(
                    f"host {host!r} is an IPv4 address in a non-standard form ({shown}); "
                    "write addresses as four decimal numbers"
                ) from None
            if not _HOST_NAME.match(host) or _NUMBER.match(host.rsplit(".", 1)[-1]):
                raise WebhookRefused(f"host {host!r} is not a valid host name") from None
        else:
            if isinstance(literal, ipaddress.IPv4Address) and str(literal) != host:
                raise WebhookRefused(f"host {host!r} is not a standard IPv4 address")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return _Parsed(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path, literal)

    async def vet(self, url: str) -> Target:
        """The address to deliver `url` to; WebhookRefused when it is not a public one."""
        parsed = self.parse(url)
        if parsed.literal is not None:
            addresses = [parsed.literal]
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    addresses = await self._resolve(parsed.host, parsed.port)
            except (OSError, TimeoutError, UnicodeError):
                raise WebhookUnresolved(f"host {parsed.host!r} does not resolve") from None
            if not addresses:
                raise WebhookUnresolved(f"host {parsed.host!r} does not resolve")
        if parsed.host in self._hosts:
            return Target(url, parsed.scheme, parsed.host, parsed.port, addresses[0], parsed.path)
        # Every address must pass: a name with one public and one internal address could be
        # connected to either.
        for address in addresses:
            if not is_public(address) and not self._allowed_address(address):
                shown = parsed.host if parsed.literal is not None else f"{parsed.host} ({address})"
                raise WebhookRefused(
                    f"host {shown} is not a public address (loopback, private, link-local, "
                    "shared, multicast or reserved); an operator may allow it with BALLAST_EDGE_WEBHOOK_ALLOWED"
                )
        return Target(url, parsed.scheme, parsed.host, parsed.port, addresses[0], parsed.path)


def delivery_id(job_id: str) -> str:
    """One id per job's delivery, the same on every attempt (a job ends once), so receivers
    can drop duplicates."""
    return "dlv_" + hashlib.sha256(job_id.encode()).hexdigest()[:32]


def load_tenant_secrets(path: str | Path) -> dict[str, str]:
    """Per-tenant webhook secrets from the keys file's `tenants:` mapping (read and validated
    with the keys, auth.read_keys_file):

        tenants:
          acme:
            webhook_secret_file: /run/secrets/acme-webhook   # or webhook_secret: "..."

    No path, a missing file or section means none (every tenant uses BALLAST_EDGE_WEBHOOK_SECRET).
    """
    return dict(read_keys_file(path).webhook_secrets)


class WebhookSecrets:
    """The secret a tenant's webhooks are signed with: its own, else the global one."""

    def __init__(self, default: str, per_tenant: Mapping[str, str] | None = None) -> None:
        self._default = default
        self._per_tenant = dict(per_tenant or {})
        self._warned: set[str] = set()

    def for_tenant(self, tenant_id: str) -> str:
        secret = self._per_tenant.get(tenant_id, self._default)
        if not secret and tenant_id not in self._warned:
            # Once per tenant and process: enough to be noticed, not one line per job.
            self._warned.add(tenant_id)
            log.warning(
                "webhooks of tenant %s go out unsigned: set BALLAST_EDGE_WEBHOOK_SECRET or a "
                "webhook_secret for the tenant in the keys file",
                tenant_id,
            )
        return secret
