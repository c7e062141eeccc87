"""`ballast migrate sessions`, what the Kubernetes migrations Job and the sessions pods' init
container run, against a real PostgreSQL schema."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services import cli
from services.sessions.store.postgres import MIGRATIONS


def _applied(dsn: str) -> list[int]:
    async def read() -> list[int]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return [
                r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
            ]
        finally:
            await conn.close()

    return asyncio.run(read())


def test_migrate_applies_once_and_wait_sees_it(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BALLAST_SESSIONS_STORE", postgres_dsn)
    # Before the Job ran, a new replica's init container keeps waiting, then gives up.
    assert cli.main(["migrate", "sessions", "--wait", "1s"]) == 1
    assert "still missing" in capsys.readouterr().err
    assert cli.main(["migrate", "sessions"]) == 0
    assert _applied(postgres_dsn) == [version for version, _, _ in MIGRATIONS]
    # Applying again changes nothing; the init container now passes at once.
    assert cli.main(["migrate", "sessions"]) == 0
    assert "none, up to date" in capsys.readouterr().err
    assert cli.main(["migrate", "sessions", "--wait", "1s"]) == 0


def test_migrate_names_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BALLAST_SESSIONS_STORE", "memory://")
    assert cli.main(["migrate", "sessions"]) == 2
    assert "BALLAST_SESSIONS_STORE='memory://' has no schema to migrate" in capsys.readouterr().err
    monkeypatch.setenv("BALLAST_SESSIONS_STORE", "postgresql://nobody@127.0.0.1:1/none")
    assert cli.main(["migrate", "sessions"]) == 2
    assert "the sessions database could not be migrated" in capsys.readouterr().err
    assert cli.main(["migrate", "sessions", "--wait", "soon"]) == 2
    assert "--wait='soon' is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["migrate", "limiter"])
