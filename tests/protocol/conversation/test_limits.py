"""The limits as pure rules: the frame limit and its close, the users' byte budgets."""

from __future__ import annotations

import pytest

from protocol.conversation.limits import ByteBudget, FrameLimit, UserBudgets, Verdict


def test_a_client_a_little_too_fast_is_slowed_down_but_never_closed() -> None:
    limit = FrameLimit(rate=20, burst=40, close_after=50, now=0.0)
    verdicts = [limit.check(index / 30) for index in range(30 * 60)]  # 30 frames/s for 60 s
    assert Verdict.CLOSE not in verdicts
    assert verdicts.count(Verdict.LIMIT) > 500  # a third of them, after the burst
    assert verdicts.count(Verdict.ALLOW) >= 20 * 60


def test_a_frame_let_through_starts_the_count_of_limited_frames_again() -> None:
    limit = FrameLimit(rate=1, burst=1, close_after=3, now=0.0)
    assert limit.check(0.0) is Verdict.ALLOW
    assert [limit.check(0.1), limit.check(0.2)] == [Verdict.LIMIT, Verdict.LIMIT]
    assert limit.check(1.3) is Verdict.ALLOW  # refilled: the two before no longer count
    assert [limit.check(1.4), limit.check(1.5)] == [Verdict.LIMIT, Verdict.LIMIT]
    assert limit.check(1.6) is Verdict.CLOSE  # three in a row


def test_a_flood_is_closed_after_the_limited_frames_in_a_row() -> None:
    limit = FrameLimit(rate=20, burst=40, close_after=50, now=0.0)
    verdicts = [limit.check(index / 10_000) for index in range(200)]
    assert verdicts[:40] == [Verdict.ALLOW] * 40
    assert verdicts.index(Verdict.CLOSE) == 40 + 49


def test_a_byte_budget_lets_a_request_start_while_above_zero_and_charges_it_after() -> None:
    budget = ByteBudget(rate=1000, burst=5000, now=0.0)
    assert budget.wait_s(0.0) == 0
    budget.spend(12_000, 0.0)  # a big page: the balance goes below zero
    assert budget.wait_s(0.0) == pytest.approx(7.001)
    assert budget.wait_s(7.0) > 0
    assert budget.wait_s(7.1) == 0
    assert not budget.full(7.1)
    assert budget.full(20.0)


def test_user_budgets_are_shared_per_user_and_full_ones_are_forgotten() -> None:
    budgets = UserBudgets(rate=100, burst=1000)
    budgets.of("ann", 0.0).spend(2000, 0.0)
    assert budgets.of("ann", 0.0).wait_s(0.0) > 0  # the same budget for every connection
    assert budgets.of("bob", 0.0).wait_s(0.0) == 0
    for index in range(UserBudgets.SWEEP_EVERY - 2):  # with ann and bob: at the mark
        budgets.of(f"idle-{index}", 1.0)  # never spend: full
    budgets.of("carl", 1.0)  # the table is swept before it grows past its mark
    assert len(budgets) == 2  # ann, still in debt, and carl
