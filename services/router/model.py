"""The router's own view of a chat call, independent of gRPC and of any provider's wire format.

The servicer translates the Ballast contract into these types; each adapter translates them
into its provider's JSON and back. Nothing here imports gRPC or httpx.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Finish(enum.Enum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    ERROR = "error"


class ToolChoiceMode(enum.Enum):
    UNSPECIFIED = "unspecified"
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class Message:
    role: Role
    content: str = ""
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    is_error: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # JSON Schema of the arguments, already parsed (an object).
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.UNSPECIFIED
    name: str = ""


@dataclass(frozen=True)
class Params:
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    params: Params = Params()


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    # Read from the provider's prompt cache; included in input_tokens.
    cached_input_tokens: int = 0
    # Written to the provider's prompt cache (Anthropic bills them above input); in input_tokens.
    cache_write_input_tokens: int = 0
    # Counted with the model's tokenizer because the provider reported no usage.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class ChatResult:
    """A finished answer from one provider."""

    message: Message
    finish: Finish
    usage: Usage
    provider_model: str = ""
    response_id: str = ""
    # The provider said the answer is simulated (the sim labels every answer).
    simulated: bool = False
    # False when the provider reported no usage: the gateway then estimates it (never zero).
    usage_reported: bool = True


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments_fragment: str = ""


@dataclass(frozen=True)
class Delta:
    """Incremental content of a stream."""

    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.text and not self.tool_calls


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    usage: Usage
    provider_model: str = ""
    simulated: bool = False
    usage_reported: bool = True


def estimate_tokens(text: str) -> int:
    """A cheap token estimate (about four characters per token), for routing decisions only."""
    return (len(text) + 3) // 4


def request_tokens(request: ChatRequest) -> int:
    total = 0
    for message in request.messages:
        total += 4 + estimate_tokens(message.content)
        for call in message.tool_calls:
            total += estimate_tokens(call.name) + estimate_tokens(call.arguments_json)
    return total
