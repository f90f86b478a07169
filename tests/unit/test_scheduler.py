"""Admission (stratus_engine/scheduler.py) as a table: waiting requests, running rows, limits and
the time in; the exact requests admitted, in order, out. No model, no onnxruntime."""

import subprocess
import sys

import pytest

from stratus_engine.scheduler import (
    INTERACTIVE_WINDOW_S,
    Limits,
    Waiting,
    admission_order,
    admit,
    default_batch_rows_beside_interactive,
    default_interactive_headroom,
    reachable,
)

LIMITS = Limits(max_batch=4, interactive_headroom=1, batch_rows_beside_interactive=1, prefill_token_budget=100)
NOW = 1000.0
QUIET = NOW - 10 * INTERACTIVE_WINDOW_S  # the last interactive request arrived long ago
ABOUT = NOW - 1.0  # ... a second ago: interactive requests are about


def I(rows=1, tokens=10):  # noqa: E743 (reads as the tier in the table)
    return Waiting(0, rows, tokens)


def B(rows=1, tokens=10):
    return Waiting(1, rows, tokens)


# (waiting in arrival order, running rows' priorities, limits changed, last interactive, admitted)
CASES = {
    "nothing waiting": ([], [], {}, QUIET, ()),
    "one request, an empty batch": ([I()], [], {}, QUIET, (0,)),
    "interactive before waiting batch, arrival order within a tier": (
        [B(), I(), B(), I()],
        [],
        {},
        QUIET,
        (1, 3, 0, 2),
    ),
    "batch priorities above 1 come after 1": ([Waiting(2, 1, 10), B()], [], {}, QUIET, (1, 0)),
    "batch rows fill the batch to max_batch": ([B(), B(), B(), B(), B()], [], {}, QUIET, (0, 1, 2, 3)),
    "a batch full of batch rows takes no batch row": ([B()], [1, 1, 1, 1], {}, QUIET, ()),
    "an interactive request joins a full batch in the headroom": ([B(), I()], [1, 1, 1, 1], {}, QUIET, (1,)),
    "the headroom holds interactive_headroom rows": ([I(), I()], [1, 1, 1, 1], {}, QUIET, (0,)),
    "no headroom: a full batch takes nothing": ([I()], [1, 1, 1, 1], {"interactive_headroom": 0}, QUIET, ()),
    "interactive rows alone number at most max_batch": ([I(), I()], [0, 0, 0], {}, QUIET, (0,)),
    "interactive rows full: nothing, though the headroom is free": ([I()], [0, 0, 0, 0], {}, QUIET, ()),
    "a group's rows go together or not at all": ([I(rows=2)], [0, 0, 0], {}, QUIET, ()),
    "the first that does not fit stops admission": ([I(rows=5), I()], [], {}, QUIET, ()),
    "a batch request too wide for the room blocks the ones behind": ([B(rows=3), B()], [1, 1], {}, QUIET, ()),
    "interactive fills beside batch rows, batch ones then wait": ([I(), I(), B()], [1, 1], {}, QUIET, (0, 1)),
    "batch rows held to the cap while interactive work is about": ([B(), B()], [0, 1], {}, ABOUT, ()),
    "under the cap batch rows still join": ([B(), B(), B()], [0, 1], {"batch_rows_beside_interactive": 2}, ABOUT, (0,)),
    "with no batch row running one batch request goes whatever its n": ([B(rows=3), B()], [0], {}, ABOUT, (0,)),
    "admitted batch rows count toward the cap": ([B(), B()], [], {}, ABOUT, (0,)),
    "interactive requests are not capped": ([I(), I(), B()], [1], {}, ABOUT, (0, 1)),
    "no interactive request for the window: the whole batch again": ([B(), B(), B()], [0, 1], {}, QUIET, (0, 1)),
    "the window is open to its end": ([B(), B()], [1], {}, NOW - INTERACTIVE_WINDOW_S + 0.01, ()),
    "and closed at it": ([B(), B()], [1], {}, NOW - INTERACTIVE_WINDOW_S, (0, 1)),
    "never an interactive request": ([B(), B()], [1], {}, float("-inf"), (0, 1)),
    "the padded prefill fits the budget": ([I(tokens=30), I(tokens=30), I(tokens=30)], [], {}, QUIET, (0, 1, 2)),
    "padding counts the longest prompt": ([I(tokens=30), I(tokens=30), I(tokens=40)], [], {}, QUIET, (0, 1)),
    "over the budget: the rest join next step": ([I(tokens=60), I(tokens=50), I(tokens=1)], [], {}, QUIET, (0,)),
    "the first request goes whatever its length": ([I(tokens=500), I()], [], {}, QUIET, (0,)),
    "the budget is the padded total, in admission order": ([B(tokens=10), I(tokens=60)], [], {}, QUIET, (1,)),
}


@pytest.mark.parametrize(("waiting", "running", "changed", "last_interactive", "admitted"), CASES.values(), ids=CASES)
def test_admit(waiting, running, changed, last_interactive, admitted):
    limits = Limits(**{**LIMITS.__dict__, **changed})
    assert admit(waiting, running, limits, NOW, last_interactive) == admitted


@pytest.mark.parametrize(("waiting", "running", "changed", "last_interactive", "admitted"), CASES.values(), ids=CASES)
def test_the_requests_admission_can_reach_decide_as_all_do(waiting, running, changed, last_interactive, admitted):
    # the engine describes only these (a stored-prefix lookup each): the decision must not change
    limits = Limits(**{**LIMITS.__dict__, **changed})
    near = reachable([(w.priority, w.tenant) for w in waiting], limits.rows - len(running))
    assert tuple(near[i] for i in admit([waiting[i] for i in near], running, limits, NOW, last_interactive)) == admitted


def test_admission_order_is_by_priority_then_arrival():
    one = lambda *ps: [(p, "") for p in ps]  # (one tenant)
    assert admission_order(one(1, 0, 2, 0, 1)) == [1, 3, 0, 4, 2]
    assert reachable(one(1, 0, 2, 0, 1), 2) == [1, 3] and reachable(one(1, 0), 0) == reachable(one(1, 0), -1) == []


@pytest.mark.parametrize(
    "waiting, running_tenants, order",
    [
        # a light tenant's request arriving behind a heavy tenant's backlog goes first, not last
        ([(0, "heavy")] * 6 + [(0, "light")], [], [6, 0, 1, 2, 3, 4, 5]),
        # ... and before it, when the heavy tenant already holds rows
        ([(0, "heavy")] * 3 + [(0, "light")], ["heavy", "heavy"], [3, 0, 1, 2]),
        # tenants take turns; a tie goes to the tenant with fewer waiting, then to the first to arrive
        ([(0, "a"), (0, "a"), (0, "b"), (0, "b"), (0, "c")], [], [4, 0, 2, 1, 3]),
        ([(0, "a"), (0, "b")], [], [0, 1]),
        # priority still comes first: a tenant's interactive request before anyone's batch work
        ([(1, "light"), (0, "heavy"), (0, "heavy")], ["heavy"] * 4, [1, 2, 0]),
        # a tenant's batch requests do not cost its interactive ones their turn
        ([(1, "a"), (1, "a"), (0, "a"), (0, "b")], [], [2, 3, 0, 1]),
    ],
)
def test_tenants_take_turns_within_a_priority(waiting, running_tenants, order):
    assert admission_order(waiting, running_tenants) == order


def test_admit_lets_a_light_tenant_past_a_heavy_tenants_backlog():
    limits = Limits(max_batch=4, interactive_headroom=0, batch_rows_beside_interactive=1, prefill_token_budget=10_000)
    waiting = [Waiting(0, 1, 10, "heavy")] * 5 + [Waiting(0, 1, 10, "light")]
    # two rows free, heavy holds the other two: light's request is admitted first, then heavy's next
    assert admit(waiting, [0, 0], limits, NOW, NOW, running_tenants=["heavy", "heavy"]) == (5, 0)


@pytest.mark.parametrize(
    ("max_batch", "gpu", "headroom", "beside"),
    [(16, True, 2, 2), (16, False, 2, 1), (4, True, 1, 1), (64, True, 8, 8), (64, False, 8, 1)],
)
def test_default_limits(max_batch, gpu, headroom, beside):
    assert default_interactive_headroom(max_batch) == headroom
    assert default_batch_rows_beside_interactive(max_batch, gpu) == beside


def test_the_scheduler_imports_no_runtime():
    # a pure decision: importable (and testable) without onnxruntime or numpy
    code = "import sys, stratus_engine.scheduler; print(sorted({'onnxruntime', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
