"""`ballast certs DIR`: a local CA and one certificate per service, for mutual TLS.

The layout is cert-manager's (`tls.crt`, `tls.key`, `ca.crt`), so the same variables point
at these files on a laptop or in compose and at a mounted Secret in Kubernetes:

    DIR/ca.crt  DIR/ca.key               the CA (keep ca.key private; it signs new certificates)
    DIR/<service>/tls.crt, tls.key, ca.crt

An existing CA in DIR is reused, so running it again renews the service certificates without
breaking trust with certificates already handed out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names every certificate carries, so clients on the same machine (ballast up, tests) verify it.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 5 * 365


@dataclass(frozen=True)
class Identity:
    """Where one service's files are."""

    name: str
    cert_file: Path
    key_file: Path
    ca_file: Path


def make_certs(
    folder: Path | str,
    names: Sequence[str],
    *,
    extra_names: Sequence[str] = (),
    days: int = 365,
) -> dict[str, Identity]:
    """Writes (or reuses) the CA in `folder` and a certificate for each of `names`.

    Each certificate is good for serving and for calling (both key usages), and names
    localhost, 127.0.0.1, ::1, the service's own name and `extra_names`, where `{service}` is
    replaced by the service's name (`{service}.ballast.svc.cluster.local`).
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(root)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    identities: dict[str, Identity] = {}
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a usable service name")
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [*LOCAL_NAMES, name, *(extra.replace("{service}", name) for extra in extra_names)]
        cert = _sign(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
            key.public_key(),
            ca_cert,
            ca_key,
            days,
            leaf_names=list(dict.fromkeys(sans)),
        )
        service_dir = root / name
        service_dir.mkdir(exist_ok=True)
        identity = Identity(
            name=name,
            cert_file=service_dir / "tls.crt",
            key_file=service_dir / "tls.key",
            ca_file=service_dir / "ca.crt",
        )
        # The key first: a service that reloads on change accepts the pair only when they match.
        _write(identity.key_file, _key_pem(key), private=True)
        _write(identity.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        _write(identity.ca_file, ca_pem)
        identities[name] = identity
    return identities


def _ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_file, key_file = root / "ca.crt", root / "ca.key"
    if cert_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: expected the EC key `ballast certs` writes")
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ballast"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Ballast local CA"),
        ]
    )
    cert = _sign(subject, key.public_key(), None, key, CA_DAYS, leaf_names=None)
    _write(key_file, _key_pem(key), private=True)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _sign(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    leaf_names: list[str] | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    is_ca = leaf_names is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A little in the past: a peer whose clock runs behind still accepts a fresh certificate.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if leaf_names is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        ).add_extension(x509.SubjectAlternativeName([_general_name(n) for n in leaf_names]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replaces `path` in one step, so a service reading it never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o600 if private else 0o644)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
