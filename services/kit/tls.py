"""TLS between Ballast's services: identities from PEM files, checked at start-up, and gRPC
credentials built from them (a server's certificate is re-read when its files change).

Internal services run mutual TLS: each serves with its certificate and accepts only callers
whose client certificate chains to the CA; each client presents its own certificate. The
files are PEM, as `ballast certs`, cert-manager (`tls.crt`, `tls.key`, `ca.crt`) and most PKIs
write them.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography` (about 11 MB resident) is imported by the functions that parse PEM files, only
# when TLS is configured: a plaintext service (`ballast up`, the cache within its memory budget)
# never loads it.

log = logging.getLogger("ballast.kit.tls")

# The variables named in errors, so an operator knows what to set.
TLS_VARIABLES = ("BALLAST_TLS_CERT_FILE", "BALLAST_TLS_KEY_FILE", "BALLAST_TLS_CA_FILE")


@dataclass(frozen=True)
class TlsFiles:
    """One TLS identity: a certificate chain and its key, and (for mutual TLS) the CA the
    peer's certificate must chain to. `variables` names the settings they came from."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    variables: tuple[str, str, str] = TLS_VARIABLES

    @property
    def mutual(self) -> bool:
        return bool(self.ca_file)


@dataclass(frozen=True)
class _Pem:
    cert: bytes
    key: bytes
    ca: bytes | None
    stamp: tuple[float, ...]


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(files: TlsFiles) -> list[str]:
    """Every problem with the files, each naming its variable; empty when they are usable."""
    try:
        pem = _load(files)
    except _FileError as exc:
        return [str(exc)]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_var, key_var, ca_var = files.variables
    problems: list[str] = []
    chain = x509.load_pem_x509_certificates(pem.cert)
    leaf = chain[0]
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        problems.append(
            f"{cert_var}={files.cert_file!r}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    key = serialization.load_pem_private_key(pem.key, password=None)
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        problems.append(
            f"{key_var}={files.key_file!r} is not the key of the certificate in {cert_var}={files.cert_file!r}"
        )
    if pem.ca is not None and not _issued_by(chain, x509.load_pem_x509_certificates(pem.ca)):
        # Peers check this service's certificate against the same CA: a certificate from
        # another CA would make every call fail at the handshake with a vaguer message.
        problems.append(
            f"{cert_var}={files.cert_file!r} is not signed by the CA in {ca_var}={files.ca_file!r}"
        )
    return problems


def _issued_by(chain: Sequence[x509.Certificate], authorities: Sequence[x509.Certificate]) -> bool:
    """True when some certificate of the chain is one of the CAs or was signed by one."""
    from cryptography.exceptions import InvalidSignature

    for cert in chain:
        for authority in authorities:
            if cert == authority:
                return True
            try:
                cert.verify_directly_issued_by(authority)
                return True
            except (ValueError, TypeError, InvalidSignature):
                continue
    return False


class _FileError(ValueError):
    pass


def _public_bytes(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if not isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _FileError(f"{variable}={path!r} cannot be read: {exc.strerror or exc}") from None


def _load(files: TlsFiles) -> _Pem:
    """Reads and parses the files; raises _FileError naming the variable of a bad one."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_var, key_var, ca_var = files.variables
    paths = [files.cert_file, files.key_file, *([files.ca_file] if files.ca_file else [])]
    stamp = tuple(_mtime(p) for p in paths)
    cert = _read(files.cert_file, cert_var)
    key = _read(files.key_file, key_var)
    ca = _read(files.ca_file, ca_var) if files.ca_file else None
    try:
        x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise _FileError(f"{cert_var}={files.cert_file!r} holds no PEM certificate") from None
    try:
        serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _FileError(f"{key_var}={files.key_file!r} holds no unencrypted PEM private key") from None
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise _FileError(f"{ca_var}={files.ca_file!r} holds no PEM certificate") from None
    return _Pem(cert=cert, key=key, ca=ca, stamp=stamp)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


class _Reloader:
    """Called by gRPC before each new connection's handshake: hands over the files again once
    they changed on disk (a rotated certificate), so rotation needs no restart. A stat of
    two or three files per connection is the whole cost; calls on a kept-alive connection
    pay nothing."""

    def __init__(self, files: TlsFiles, current: _Pem) -> None:
        self._files = files
        self._current = current
        self._lock = threading.Lock()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        files = self._files
        paths = [files.cert_file, files.key_file, *([files.ca_file] if files.ca_file else [])]
        stamp = tuple(_mtime(p) for p in paths)
        with self._lock:
            if stamp == self._current.stamp:
                return None
            try:
                problems = check(files)
                if problems:
                    raise _FileError("; ".join(problems))
                fresh = _load(files)
            except Exception as exc:
                # Mid-rotation (the certificate written, the key not yet), or anything else
                # unexpected: keep serving with the old pair and look again on the next
                # connection. Raising here would fail the caller's handshake instead.
                log.warning("tls files changed but are not usable yet: %s", exc)
                return None
            self._current = fresh
        log.info("tls certificate reloaded", extra={"cert_file": files.cert_file})
        return _server_config(fresh)


def _server_config(pem: _Pem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Serves with the certificate; with a CA, callers must present a certificate it signed."""
    pem = _load(files)
    return grpc.dynamic_ssl_server_credentials(
        _server_config(pem),
        # gRPC documents None as "no change", which types-grpcio's stub does not allow for.
        _Reloader(files, pem),  # type: ignore[arg-type]
        require_client_authentication=files.mutual,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Presents this service's certificate and trusts only servers the CA signed.

    Read when the channel opens: after a rotation a client keeps presenting its previous
    certificate (still valid until it expires) until the process restarts.
    """
    pem = _load(files)
    return grpc.ssl_channel_credentials(
        root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert
    )


def insecure_internal_problem(service: str, host: str, variables: Sequence[str] = TLS_VARIABLES) -> str:
    return (
        f"{service} would listen on BALLAST_HOST={host!r} without TLS, so anyone who reaches the port "
        f"could act as any tenant: set {', '.join(variables)} (mutual TLS between services; "
        "`ballast certs DIR` makes a local CA and certificates), or BALLAST_INSECURE_INTERNAL=true "
        "if a service mesh already provides mutual TLS, or listen on 127.0.0.1"
    )
