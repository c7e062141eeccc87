"""The context window and the compaction cut, as pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.sessions.compaction import choose_cut
from services.sessions.context import Window
from services.sessions.model import (
    ROLE_ASSISTANT,
    ROLE_TOOL,
    ROLE_USER,
    Counters,
    SessionRecord,
    StoredTurn,
)


def _turns(spec: list[tuple[int, int]]) -> list[StoredTurn]:
    """(role, tokens) → turns with seq from 1; an assistant before a tool turn has one tool call."""
    out = []
    for i, (role, tokens) in enumerate(spec):
        calls = 1 if role == ROLE_ASSISTANT and i + 1 < len(spec) and spec[i + 1][0] == ROLE_TOOL else 0
        out.append(StoredTurn(i + 1, role, tokens, calls, b"", 0.0))
    return out


def _window(turns: list[StoredTurn], budget: int) -> list[int]:
    window = Window(budget, lambda t: t.token_count)
    for turn in reversed(turns):
        if not window.offer(turn):
            break
    return [t.seq for t, _ in window.oldest_first()]


def test_window_takes_the_newest_turns_that_fit() -> None:
    turns = _turns([(ROLE_USER, 10), (ROLE_ASSISTANT, 10), (ROLE_USER, 10), (ROLE_ASSISTANT, 10)])
    assert _window(turns, 25) == [3, 4]
    assert _window(turns, 40) == [1, 2, 3, 4]
    assert _window(turns, 9) == []


def test_window_keeps_a_call_and_its_results_together() -> None:
    turns = _turns([(ROLE_USER, 5), (ROLE_ASSISTANT, 5), (ROLE_TOOL, 5), (ROLE_TOOL, 5), (ROLE_ASSISTANT, 5)])
    assert _window(turns, 19) == [5]
    assert _window(turns, 20) == [2, 3, 4, 5]


_roles = st.sampled_from([ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL])


@given(st.lists(st.tuples(_roles, st.integers(1, 50)), max_size=30), st.integers(1, 400))
def test_window_properties(spec: list[tuple[int, int]], budget: int) -> None:
    turns = _turns(spec)
    chosen = _window(turns, budget)
    # Within budget, a contiguous suffix, and never starting with a tool result.
    assert sum(turns[s - 1].token_count for s in chosen) <= budget
    if chosen:
        assert chosen == list(range(chosen[0], chosen[0] + len(chosen)))
        assert turns[chosen[0] - 1].role != ROLE_TOOL
        assert chosen[-1] == len(turns) or all(t.role == ROLE_TOOL for t in turns[chosen[-1] :])


@given(st.lists(st.tuples(_roles, st.integers(1, 50)), min_size=1, max_size=30), st.integers(0, 300))
def test_cut_never_leaves_a_tool_result_first(spec: list[tuple[int, int]], keep: int) -> None:
    turns = _turns(spec)
    record = SessionRecord("s", "t", "u", "", {}, 0, 0, 1, 1, counters=Counters(turns=len(turns)))
    record.total_tokens = sum(t.token_count for t in turns)
    cut = choose_cut(record, turns, keep, more=False)
    assert 0 <= cut <= len(turns)
    if 0 < cut < len(turns):
        assert turns[cut].role != ROLE_TOOL
    if record.total_tokens <= keep:
        assert cut == 0
    # With the whole tail given, at most `keep` tokens stay unsummarised...
    assert sum(t.token_count for t in turns[cut:]) <= keep
    # ...and it folds no more than needed: every earlier valid cut would have kept too much.
    for earlier in range(1, cut):
        if turns[earlier].role != ROLE_TOOL:
            assert sum(t.token_count for t in turns[earlier:]) > keep
