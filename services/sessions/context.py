"""Choosing the context window: the most recent turns that fit a token budget.

Turns are seen newest first. A tool result is never shown without the assistant turn
that called the tool, nor that assistant turn without its results: tool-result turns are
held until the turn before them (the call) is seen, and the group goes in whole or not
at all. The window is a contiguous suffix of the unsummarised history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.sessions.model import ROLE_TOOL, StoredTurn


@dataclass
class Window:
    budget: int
    count: Callable[[StoredTurn], int]
    # Chosen turns, newest first, with the tokens each was counted at.
    chosen: list[tuple[StoredTurn, int]] = field(default_factory=list)
    used: int = 0
    full: bool = False
    _pending: list[tuple[StoredTurn, int]] = field(default_factory=list)
    _pending_tokens: int = 0

    def offer(self, turn: StoredTurn) -> bool:
        """Adds the next older turn; False once the window is full (stop reading)."""
        if self.full:
            return False
        tokens = self.count(turn)
        self._pending.append((turn, tokens))
        self._pending_tokens += tokens
        if turn.role == ROLE_TOOL:
            # Wait for the assistant turn that made the call.
            return self._pending_tokens <= self.budget - self.used or self._give_up()
        if self._pending_tokens > self.budget - self.used:
            return self._give_up()
        self.chosen.extend(self._pending)
        self.used += self._pending_tokens
        self._pending = []
        self._pending_tokens = 0
        return True

    def _give_up(self) -> bool:
        self.full = True
        self._pending = []
        self._pending_tokens = 0
        return False

    def oldest_first(self) -> list[tuple[StoredTurn, int]]:
        return self.chosen[::-1]
