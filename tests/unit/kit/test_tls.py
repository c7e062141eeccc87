"""Mutual TLS between services: who may call an internal port, which settings start, the
plaintext health port, certificate rotation and `ballast certs`.

Every test uses real grpc.aio servers on port 0 and real certificates made by `ballast certs`
(services/kit/certs.py) in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import cli
from services.kit import tls
from services.kit.certs import Identity, make_certs
from services.kit.config import DEFAULT_HEALTH_PORTS, ConfigError, Env, ServerSettings
from services.testing import Suite
from tests.conftest import SuiteFactory

ROOT = Path(__file__).resolve().parents[3]
FORGED = sessions_pb2.ListTurnsRequest(
    caller=common_pb2.Caller(tenant_id="globex", user_id="dave", tier="paid"), session_id="s-1"
)


def _files(identity: Identity) -> tls.TlsFiles:
    return tls.TlsFiles(str(identity.cert_file), str(identity.key_file), str(identity.ca_file))


def _env(identity: Identity, **extra: str) -> dict[str, str]:
    return {
        "BALLAST_TLS_CERT_FILE": str(identity.cert_file),
        "BALLAST_TLS_KEY_FILE": str(identity.key_file),
        "BALLAST_TLS_CA_FILE": str(identity.ca_file),
        **extra,
    }


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def _list_turns(suite: Suite, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a forged ListTurns: OK or the error's code."""
    address = suite.address("sessions")
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        try:
            await sessions_pb2_grpc.SessionsServiceStub(channel).ListTurns(FORGED, timeout=20)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def sessions(suite_factory: SuiteFactory, tmp_path: Path) -> Suite:
    return await suite_factory(["sessions"], tls_dir=tmp_path / "certs")


async def test_a_caller_without_a_client_certificate_is_refused_at_the_handshake(sessions: Suite) -> None:
    assert await _list_turns(sessions, None) == grpc.StatusCode.UNAVAILABLE
    # TLS without a certificate of its own: the server asks for one and ends the handshake.
    assert sessions.client_tls is not None
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=_read(sessions.client_tls.ca_file))
    assert await _list_turns(sessions, no_client_cert) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(sessions: Suite, tmp_path: Path) -> None:
    stranger = make_certs(tmp_path / "other-ca", ["router"])["router"]
    trusted_ca = sessions.running["sessions"].app.server_settings.server_tls.ca_file  # type: ignore[union-attr]
    # It trusts the suite's CA (so the server is accepted) but presents a certificate the suite never signed.
    forged = tls.TlsFiles(str(stranger.cert_file), str(stranger.key_file), trusted_ca)
    assert await _list_turns(sessions, tls.channel_credentials(forged)) == grpc.StatusCode.UNAVAILABLE


async def test_a_service_certificate_from_the_ca_gets_through(sessions: Suite) -> None:
    assert sessions.client_tls is not None
    status = await _list_turns(sessions, tls.channel_credentials(sessions.client_tls))
    assert status == grpc.StatusCode.NOT_FOUND  # past the handshake: the servicer answered


async def test_health_is_on_a_plaintext_port_that_serves_nothing_else(sessions: Suite) -> None:
    running = sessions.running["sessions"]
    assert running.health_port and running.health_port != running.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ballast.sessions.v1.SessionsService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sessions_pb2_grpc.SessionsServiceStub(channel).ListTurns(FORGED, timeout=20)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Shutdown shows on the health port too, so a probe stops routing before the drain.
        await running.health.enter_graceful_shutdown()
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_rotated_certificate_is_served_without_a_restart(sessions: Suite, tmp_path: Path) -> None:
    served = sessions.running["sessions"].app.server_settings.server_tls
    assert served is not None
    # A whole new CA, so only the rotated files can let its client in.
    fresh = make_certs(tmp_path / "rotated", ["sessions", "client"])
    client = tls.channel_credentials(_files(fresh["client"]))
    assert await _list_turns(sessions, client) == grpc.StatusCode.UNAVAILABLE
    for source, target in (
        (fresh["sessions"].key_file, served.key_file),
        (fresh["sessions"].cert_file, served.cert_file),
        (fresh["sessions"].ca_file, served.ca_file),
    ):
        shutil.copyfile(source, target + ".new")
        os.replace(target + ".new", target)
    assert await _list_turns(sessions, client) == grpc.StatusCode.NOT_FOUND


def test_an_internal_service_on_a_public_address_without_tls_is_refused() -> None:
    for service in ("router", "limiter", "cache", "sessions"):
        env = Env({"BALLAST_HOST": "0.0.0.0"})
        ServerSettings.from_env(service, env)
        with pytest.raises(ConfigError) as info:
            env.check()
        message = str(info.value)
        for variable in (*tls.TLS_VARIABLES, "BALLAST_INSECURE_INTERNAL"):
            assert variable in message
    # Loopback, a mesh that provides mTLS, and the public edge may listen without it.
    for service, environ in (
        ("sessions", {"BALLAST_HOST": "127.0.0.1"}),
        ("sessions", {"BALLAST_HOST": "::1"}),
        ("sessions", {"BALLAST_HOST": "0.0.0.0", "BALLAST_INSECURE_INTERNAL": "true"}),
        ("edge", {"BALLAST_HOST": "0.0.0.0"}),
    ):
        env = Env(environ)
        settings = ServerSettings.from_env(service, env)
        env.check()
        assert settings.server_tls is None and settings.health_port is None


def test_ballast_serve_sessions_on_0000_without_tls_exits_naming_the_variables() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BALLAST_")}
    environ.update({"BALLAST_HOST": "0.0.0.0", "BALLAST_SESSIONS_PORT": "0", "BALLAST_METRICS": "false"})
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "sessions"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    for variable in (*tls.TLS_VARIABLES, "BALLAST_INSECURE_INTERNAL"):
        assert variable in done.stderr


def test_tls_settings_are_all_or_nothing_and_checked(tmp_path: Path) -> None:
    made = make_certs(tmp_path / "a", ["router", "limiter"])
    other = make_certs(tmp_path / "b", ["router"])
    router = made["router"]

    env = Env(_env(router, BALLAST_HOST="0.0.0.0"))
    settings = ServerSettings.from_env("router", env)
    env.check()
    assert settings.server_tls == settings.client_tls == _files(router) and settings.server_tls.mutual
    assert settings.health_port == DEFAULT_HEALTH_PORTS["router"] == 50062

    cases = {
        "BALLAST_TLS_CA_FILE must be set": {
            k: v for k, v in _env(router).items() if k != "BALLAST_TLS_CA_FILE"
        },
        "is not the key of the certificate": _env(router, BALLAST_TLS_KEY_FILE=str(made["limiter"].key_file)),
        "is not signed by the CA": _env(router, BALLAST_TLS_CA_FILE=str(other["router"].ca_file)),
        "BALLAST_TLS_CERT_FILE='/nope.crt' cannot be read": _env(router, BALLAST_TLS_CERT_FILE="/nope.crt"),
        "BALLAST_TLS_KEY_FILE=": _env(router, BALLAST_TLS_KEY_FILE=str(router.cert_file)),
    }
    for expected, environ in cases.items():
        env = Env(environ)
        ServerSettings.from_env("router", env)
        with pytest.raises(ConfigError) as info:
            env.check()
        assert expected in str(info.value), (expected, str(info.value))


def test_the_edge_serves_the_public_with_a_server_certificate_only(tmp_path: Path) -> None:
    made = make_certs(tmp_path, ["edge"])
    edge = made["edge"]
    env = Env(
        {
            **_env(edge),
            "BALLAST_EDGE_TLS_CERT_FILE": str(edge.cert_file),
            "BALLAST_EDGE_TLS_KEY_FILE": str(edge.key_file),
        }
    )
    settings = ServerSettings.from_env("edge", env)
    env.check()
    assert settings.server_tls is not None and not settings.server_tls.mutual
    assert settings.client_tls == _files(edge)  # its calls inside still present a certificate
    assert settings.health_port == DEFAULT_HEALTH_PORTS["edge"]


def test_a_list_of_replicas_is_checked_against_the_service_name(tmp_path: Path) -> None:
    from services.kit.clients import _server_name

    env = Env({"BALLAST_ROUTER_ADDR": "10.0.0.1:50052,10.0.0.2:50052"})
    settings = ServerSettings.from_env("sessions", env)
    assert _server_name("10.0.0.1:50052,10.0.0.2:50052", settings) == "router"
    assert _server_name("router:50052", settings) == ""  # one host: gRPC checks it itself


def test_ballast_certs_makes_a_ca_and_a_certificate_per_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["certs", str(folder), "--name", "{service}.ballast.svc", "--identity", "operator"]) == 0
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    assert (folder / "ca.key").stat().st_mode & 0o077 == 0
    for name in ("edge", "router", "limiter", "cache", "sessions", "operator"):
        cert = x509.load_pem_x509_certificate((folder / name / "tls.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", name, f"{name}.ballast.svc"} <= set(names.get_values_for_type(x509.DNSName))
        assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
        assert (folder / name / "tls.key").stat().st_mode & 0o077 == 0
        assert (folder / name / "ca.crt").read_bytes() == (folder / "ca.crt").read_bytes()
        assert not tls.check(
            _files(
                Identity(name, folder / name / "tls.crt", folder / name / "tls.key", folder / name / "ca.crt")
            )
        )
    # Again: the CA stays, so certificates already handed out keep being trusted.
    before = (folder / "ca.crt").read_bytes()
    assert cli.main(["certs", str(folder)]) == 0
    assert (folder / "ca.crt").read_bytes() == before
    assert "ca.key" in capsys.readouterr().out


def test_a_plaintext_service_does_not_load_cryptography(tmp_path: Path) -> None:
    # cryptography is about 11 MB resident (bench/cache_memory.py); only TLS files need it. A fresh
    # interpreter: this one has loaded it for the other tests.
    router = make_certs(tmp_path, ["router"])["router"]
    program = (
        "import sys\n"
        "import services.kit.entry, services.kit.server, services.kit.clients\n"
        "from services.kit.config import Env, ServerSettings\n"
        "env = Env({})\n"
        "ServerSettings.from_env('router', env)\n"
        "env.check()\n"
        "assert 'cryptography' not in sys.modules, 'cryptography imported'\n"
        f"env = Env({_env(router)!r})\n"
        "settings = ServerSettings.from_env('router', env)\n"
        "env.check()\n"
        "assert settings.server_tls is not None and 'cryptography' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
