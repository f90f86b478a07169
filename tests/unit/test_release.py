"""The pure parts of metered batch release (stratus.release): fair shares, plans, targets, send groups."""

from __future__ import annotations

import functools
import operator
import random

import pytest

from stratus.jobstore import SQS_LIMIT_BYTES
from stratus.keys import BatchRoom
from stratus.release import Meter, Pending, _groups, affordable, fair_shares, plan, target


@pytest.mark.parametrize(
    "room, wants, expected",
    [
        (10, {"a": 100, "b": 3, "c": 100}, {"a": 4, "b": 3, "c": 3}),  # b's unused share goes to the others
        (9, {"a": 100, "b": 100, "c": 100}, {"a": 3, "b": 3, "c": 3}),
        (2, {"a": 5, "b": 5, "c": 5}, {"a": 1, "b": 1, "c": 0}),  # leftovers: the oldest first
        (100, {"a": 5, "b": 0, "c": 7}, {"a": 5, "b": 0, "c": 7}),  # room to spare: everyone's all
        (0, {"a": 5}, {"a": 0}),
        (7, {}, {}),
    ],
)
def test_fair_shares_split_the_room_evenly_as_far_as_wants_allow(room, wants, expected):
    assert fair_shares(room, wants) == expected


def test_fair_shares_are_max_min_fair_on_random_cases():
    rng = random.Random(0)
    for _ in range(500):
        wants = {str(i): rng.choice([0, 1, 2, 5, 50, 1000]) for i in range(rng.randint(1, 6))}
        room = rng.randint(0, 300)
        got = fair_shares(room, wants)
        assert sum(got.values()) == min(room, sum(wants.values()))
        assert all(0 <= got[k] <= wants[k] for k in wants)
        # nobody who got less than they wanted is more than one line behind anyone else
        short = [got[k] for k in wants if got[k] < wants[k]]
        if short:
            assert max(got.values()) - min(short) <= 1


@pytest.mark.parametrize(
    "room, wants, weights, expected",
    [
        (11, {"a": 100, "b": 100}, {"a": 10.0, "b": 1.0}, {"a": 1, "b": 10}),  # the same tokens each
        (20, {"a": 100, "b": 5}, {"a": 10.0, "b": 1.0}, {"a": 15, "b": 5}),  # b's unused share goes to a
        (3, {"a": 100, "b": 100}, {"a": 10.0, "b": 1.0}, {"a": 0, "b": 3}),  # too little room for a's first line yet
        (10, {"a": 100, "b": 100}, {"a": 2.0, "b": 2.0}, {"a": 5, "b": 5}),  # equal weights: as unweighted
    ],
)
def test_weighted_shares_give_each_claimant_the_same_tokens(room, wants, weights, expected):
    assert fair_shares(room, wants, weights) == expected


def test_weighted_shares_are_max_min_fair_on_random_cases():
    rng = random.Random(1)
    for _ in range(500):
        keys = [str(i) for i in range(rng.randint(1, 6))]
        wants = {k: rng.choice([0, 1, 2, 5, 50, 1000]) for k in keys}
        weights = {k: rng.choice([1.0, 3.5, 16.0, 200.0, 2048.0]) for k in keys}
        room = rng.randint(0, 300)
        got = fair_shares(room, wants, weights)
        assert sum(got.values()) == min(room, sum(wants.values()))
        assert all(0 <= got[k] <= wants[k] for k in keys)
        # nobody who got less than they wanted would have more tokens than anyone else with one more line
        for k in keys:
            if got[k] < wants[k]:
                assert all(got[j] * weights[j] <= (got[k] + 1) * weights[k] + 1e-6 for j in keys), (k, got)


def test_tenants_share_first_then_each_tenants_batches():
    # Given tenant a with two batches and tenant b with one, all with plenty of lines left
    pending = [Pending("a1", "a", 0, 500, 1), Pending("b1", "b", 10, 300, 2), Pending("a2", "a", 0, 500, 3)]
    # When 40 lines fit: b gets half, and a's half is split between its batches
    assert plan(40, pending) == {"a1": 10, "a2": 10, "b1": 20}
    # and a batch nearly done leaves its room to the rest
    assert plan(40, [Pending("a1", "a", 498, 500, 1), Pending("b1", "b", 0, 300, 2)]) == {"a1": 2, "b1": 38}


def test_tenants_share_tokens_not_lines():
    # Given tenant a whose lines are ten times longer than tenant b's
    pending = [Pending("a1", "a", 0, 500, 1, line_tokens=2000.0), Pending("b1", "b", 0, 500, 2, line_tokens=200.0)]
    # When 44 lines fit, each tenant gets about the same tokens: a 4 lines, b 40
    assert plan(44, pending) == {"a1": 4, "b1": 40}


def test_a_tenants_batch_budget_caps_its_lines_and_the_others_take_the_room():
    # Given tenants a and b with lines of 100 tokens, a with 450 of its 1,000 tokens a minute left
    pending = [Pending("a1", "a", 0, 500, 1, line_tokens=100.0), Pending("b1", "b", 0, 500, 2, line_tokens=100.0)]
    budgets = {"a": BatchRoom(1000, used=550), "b": BatchRoom(10**6, used=0)}
    # When 40 lines fit: a gets the 4 its budget pays for, b the rest
    assert plan(40, pending, budgets) == {"a1": 4, "b1": 36}
    # and a tenant whose minute is spent gets none, while a fresh minute pays one line at least
    assert plan(40, pending, {"a": BatchRoom(1000, used=1000), "b": budgets["b"]}) == {"b1": 40}
    assert plan(40, pending, {"a": BatchRoom(50, used=0), "b": budgets["b"]}) == {"a1": 1, "b1": 39}


def test_a_tenants_lines_never_cost_more_than_its_budget_has_left():
    rng = random.Random(2)
    for _ in range(300):
        pending = [
            Pending(f"b{i}", rng.choice("ab"), 0, rng.randint(1, 50), i, line_tokens=rng.choice([10.0, 100.0, 1000.0]))
            for i in range(rng.randint(1, 5))
        ]
        budgets = {t: BatchRoom(5000, used=rng.randint(1, 5000)) for t in "ab"}  # (a used minute: no free line)
        shares = plan(rng.randint(0, 100), pending, budgets)
        for t in "ab":
            spent = sum(shares.get(p.batch_id, 0) * p.line_tokens for p in pending if p.tenant == t)
            assert spent <= budgets[t].left, (pending, budgets, shares)


@pytest.mark.parametrize(
    "room, line_tokens, lines",
    [
        (BatchRoom(1000, 400), 100.0, 6),
        (BatchRoom(1000, 0), 2000.0, 1),  # a fresh minute pays one line, however long
        (BatchRoom(1000, 1), 2000.0, 0),
        (BatchRoom(1000, 1200), 1.0, 0),  # over (a racing step): nothing, never negative
        (BatchRoom(300, 0), 100.0, 3),  # exactly
    ],
)
def test_affordable_lines(room, line_tokens, lines):
    assert affordable(room, line_tokens) == lines


def test_the_target_covers_what_workers_hold_and_took_or_the_floor():
    assert target(64, visible=0, in_flight=0, meter=Meter()) == 64  # nothing known yet: the floor
    assert target(64, visible=10, in_flight=48, meter=Meter()) == 96  # twice what workers hold
    # last step saw 100 visible and sent 50; 30 are left: workers took 120 since
    assert target(64, visible=30, in_flight=16, meter=Meter(visible=100, released=50)) == 240


def test_send_groups_hold_ten_messages_and_fit_one_call():
    assert [len(g) for g in _groups(["x"] * 25)] == [10, 10, 5]
    big = "y" * (SQS_LIMIT_BYTES // 3)  # three fill a call to just under its limit; a fourth does not fit
    groups = _groups([big] * 7)
    assert [len(g) for g in groups] == [3, 3, 1] and functools.reduce(operator.iadd, groups, []) == list(range(7))
