"""bench/chat_cpu.py's interval for a change: paired rounds, so drift shared by a pair cancels."""

from __future__ import annotations

import pytest

from bench.chat_cpu import paired_interval


def test_a_steady_change_under_drift_has_a_tight_interval() -> None:
    # The machine slows down and speeds up between rounds; within each pair the change is 25%.
    old = [2.0, 2.6, 1.7, 2.3, 1.9]
    new = [value * 1.25 for value in old]
    low, high = paired_interval(old, new) or (0.0, 0.0)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_noise_without_a_change_gives_an_interval_around_zero() -> None:
    old = [2.0, 2.1, 1.9, 2.05]
    new = [2.1, 2.0, 1.95, 2.0]
    low, high = paired_interval(old, new) or (1.0, 1.0)
    assert low < 0 < high


def test_one_round_gives_no_interval() -> None:
    assert paired_interval([2.0], [2.5]) is None
