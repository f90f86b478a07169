"""Admission: which waiting requests join the running batch at the next step (docs/scheduling.md).

A pure decision over plain data; the engine executes it (prefills what is admitted). Rules:

  order       lowest priority first (0 interactive, 1 batch); within a priority, tenants take turns:
              a request's turn is the rows its tenant has running plus its tenant's requests waiting
              ahead of it; ties go to the tenant with fewer requests waiting, then by arrival. So a
              tenant sending a tenth as much is not queued behind another's backlog (one tenant
              alone: arrival order)
  rows        interactive rows number at most max_batch, and all rows max_batch + interactive_headroom;
              batch rows fill the batch to max_batch at most (the headroom is interactive work's)
  cap         while interactive requests are about (one arrived in the last INTERACTIVE_WINDOW_S),
              batch rows are held to batch_rows_beside_interactive, so interactive rows decode in a
              small batch's step time; with no batch row running, one batch request goes whatever its
              n (batch work is never starved)
  budget      the padded prefill (longest prompt x requests) fits prefill_token_budget; the first
              request goes whatever its length
  stop        the first request that does not fit ends admission: nothing behind it overtakes it
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

INTERACTIVE_WINDOW_S = 5.0  # an interactive request this recent means more are likely: keep batch rows few
INTERACTIVE = 0  # priority of interactive requests; any higher value is batch work


@dataclass(frozen=True)
class Waiting:
    priority: int  # 0 interactive, 1 batch (tiers)
    rows: int  # its choices (n): one row each, admitted together
    tokens: int  # prompt tokens its prefill runs (after a stored prefix it will reuse)
    tenant: str = ""  # who asked: tenants take turns within a priority


@dataclass(frozen=True)
class Limits:
    max_batch: int  # rows of interactive work alone, and of batch work
    interactive_headroom: int  # rows beyond max_batch that only interactive requests may take
    batch_rows_beside_interactive: int  # batch rows while interactive requests are about
    prefill_token_budget: int  # padded prompt tokens one step's prefill may run

    @property
    def rows(self) -> int:
        """Rows of both tiers together: the KV cache's."""
        return self.max_batch + self.interactive_headroom


def default_interactive_headroom(max_batch: int) -> int:
    return max(1, max_batch // 8)


def default_batch_rows_beside_interactive(max_batch: int, gpu: bool) -> int:
    """On a GPU a decode step costs about the same for a few rows as for one, so max_batch // 8 (at
    least one, so batch work never stops); on a CPU it costs about in proportion to its rows, so one
    (measured on 2 cores with the local stack: interactive p50 1.6x idle with two, docs/scheduling.md)."""
    return max(1, max_batch // 8) if gpu else 1


def admission_order(waiting: Sequence[tuple[int, str]], running_tenants: Sequence[str] = ()) -> list[int]:
    """Indices of waiting requests, (priority, tenant) in arrival order, in the order admission
    considers them: lowest priority first; within a priority by turn (the rows the tenant has
    running, `running_tenants` a row each, plus its requests at that priority waiting ahead), then
    the tenant with fewer requests waiting at that priority, then arrival.
      admission_order([(0, "a"), (0, "a"), (0, "a"), (0, "b")]) == [0, 3, 1, 2]
      admission_order([(0, "a"), (0, "b")], running_tenants=["b", "a", "a"]) == [1, 0]"""
    rows, ahead, keys = Counter(running_tenants), Counter(), []
    for i, (priority, tenant) in enumerate(waiting):
        keys.append([priority, rows[tenant] + ahead[priority, tenant], tenant, i])
        ahead[priority, tenant] += 1
    for key in keys:
        key[2] = ahead[key[0], key[2]]  # the tenant's requests waiting at this priority
    return sorted(range(len(waiting)), key=keys.__getitem__)


def reachable(waiting: Sequence[tuple[int, str]], free_rows: int, running_tenants: Sequence[str] = ()) -> list[int]:
    """The waiting requests admission can reach, in its order: each admitted takes a row at least,
    so at most free_rows of them (the engine looks up the prompt tokens of these alone)."""
    return admission_order(waiting, running_tenants)[: max(0, free_rows)]


def admit(
    waiting: Sequence[Waiting],
    running: Sequence[int],
    limits: Limits,
    now: float,
    last_interactive: float,
    running_tenants: Sequence[str] = (),
) -> tuple[int, ...]:
    """waiting (arrival order), running (each running row's priority; running_tenants: its tenant)
    -> indices into `waiting` of the requests to admit, in the order their rows are to be prefilled."""
    interactive_about = now - last_interactive < INTERACTIVE_WINDOW_S
    rows, batch_rows = len(running), sum(1 for p in running if p > INTERACTIVE)
    admitted: list[int] = []
    longest = 0
    for i in admission_order([(w.priority, w.tenant) for w in waiting], running_tenants):
        w = waiting[i]
        if w.priority == INTERACTIVE:  # up to max_batch of its own, into the headroom
            if rows - batch_rows + w.rows > limits.max_batch or rows + w.rows > limits.rows:
                break
        elif rows + w.rows > limits.max_batch or (
            interactive_about and batch_rows and batch_rows + w.rows > limits.batch_rows_beside_interactive
        ):
            break
        else:
            batch_rows += w.rows
        tokens = max(longest, w.tokens)
        if admitted and tokens * (len(admitted) + 1) > limits.prefill_token_budget:
            break  # the padded prefill would exceed the budget; the rest join next step
        admitted.append(i)
        rows, longest = rows + w.rows, tokens
    return tuple(admitted)
