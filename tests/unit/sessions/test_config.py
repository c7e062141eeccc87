"""Sessions settings: defaults, and bad values reported by variable name."""

from __future__ import annotations

import pytest

from services.kit.config import ConfigError, Env
from services.sessions.config import SessionsSettings


def _load(environ: dict[str, str]) -> SessionsSettings:
    env = Env(environ)
    settings = SessionsSettings.from_env(env)
    env.check()
    return settings


def test_defaults_are_embedded_and_bounded() -> None:
    settings = _load({})
    assert settings.store_url == "memory://" and settings.read_store_url == ""
    assert 0 < settings.default_page_size <= settings.max_page_size
    assert settings.compact_keep_tokens < settings.compact_threshold_tokens


def test_values_are_read() -> None:
    settings = _load(
        {
            "BALLAST_SESSIONS_STORE": "postgresql://u@db:5432/s",
            "BALLAST_SESSIONS_READ_STORE": "postgresql://u@replica:5432/s",
            "BALLAST_SESSIONS_DEFAULT_TTL": "2h",
            "BALLAST_SESSIONS_COMMAND_TIMEOUT": "250ms",
            "BALLAST_SESSIONS_MAX_PAGE_SIZE": "20",
        }
    )
    assert settings.read_store_url.startswith("postgresql://u@replica")
    assert settings.default_ttl == 7200 and settings.command_timeout == 0.25 and settings.max_page_size == 20


def test_bad_values_name_every_variable() -> None:
    with pytest.raises(ConfigError) as info:
        _load(
            {
                "BALLAST_SESSIONS_STORE": "redis://localhost",
                "BALLAST_SESSIONS_READ_STORE": "memory://",
                "BALLAST_SESSIONS_CONNECT_TIMEOUT": "soon",
                "BALLAST_SESSIONS_MAX_PAGE_SIZE": "0",
            }
        )
    text = str(info.value)
    for name in ("STORE=", "READ_STORE=", "CONNECT_TIMEOUT=", "MAX_PAGE_SIZE="):
        assert f"BALLAST_SESSIONS_{name}" in text


def test_compaction_retry_backoff_is_configured_and_checked() -> None:
    settings = _load(
        {
            "BALLAST_SESSIONS_COMPACT_RETRY_INITIAL": "2s",
            "BALLAST_SESSIONS_COMPACT_RETRY_MAX": "1m",
            "BALLAST_SESSIONS_CONTEXT_COMPACT_WAIT": "0",
        }
    )
    assert (settings.compact_retry_initial, settings.compact_retry_max) == (2.0, 60.0)
    assert settings.context_compact_wait == 0
    with pytest.raises(ConfigError) as info:
        _load({"BALLAST_SESSIONS_COMPACT_RETRY_INITIAL": "10s", "BALLAST_SESSIONS_COMPACT_RETRY_MAX": "5s"})
    assert "BALLAST_SESSIONS_COMPACT_RETRY_MAX" in str(info.value)


def test_sessions_per_user_cap_is_configured() -> None:
    assert _load({}).max_sessions_per_user == 10_000
    assert _load({"BALLAST_SESSIONS_MAX_PER_USER": "0"}).max_sessions_per_user == 0
    with pytest.raises(ConfigError) as info:
        _load({"BALLAST_SESSIONS_MAX_PER_USER": "-1"})
    assert "BALLAST_SESSIONS_MAX_PER_USER" in str(info.value)
