"""The HTTP face's request-size limit, with a suite of its own (a small limit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson

from tests.conftest import SuiteFactory
from tests.support.openai_http import http_url
from tests.support.suite_config import write_test_config


async def test_body_limit_and_a_trickled_body(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    environ = {**write_test_config(tmp_path), "BALLAST_EDGE_HTTP_MAX_BODY_BYTES": "2048"}
    small = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    async with httpx.AsyncClient(base_url=http_url(small), timeout=60) as http:
        key = {"authorization": "Bearer bk_demo_paid"}
        big = {"model": "sim-small", "messages": [_user_message("x" * 4096)]}
        declared = await http.post("/chat/completions", headers=key, json=big)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            payload = orjson.dumps(big)
            for start in range(0, len(payload), 512):
                yield payload[start : start + 512]

        # No content-length: the limit is counted as the body arrives.
        chunked = await http.post("/chat/completions", headers=key, content=chunks())
        assert chunked.status_code == 413
        fine = await http.post(
            "/chat/completions", headers=key, json={"model": "sim-small", "messages": [_user_message("hi")]}
        )
        assert fine.status_code == 200


def _user_message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}
