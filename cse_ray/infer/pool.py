"""A pool of Ray actors fed one item at a time: the least busy live actor, a bounded number in flight.

The scheduling part of exactly-once output, shared by stages whose actors each write their own files
(the random walk): the caller says how to submit an item and what to do with its finished reference;
an actor that died for good is left out of the rest of the run. What counts as done, what gets a
manifest row and how a rerun skips finished items stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cse_ray.errors import RunFailed


def actors_lost(kind: str, left: int) -> RunFailed:
    """The one message for a stage whose actors all died for good: what was left, and that a rerun
    resumes it."""
    return RunFailed(f"every {kind} actor died; {left} images were not processed (rerun to resume)")


def run_on_actors(actors: Sequence[Any], items: Iterable[Any], submit: Callable[[Any, Any], Any],
                  collect: Callable[[Any, int, Any], bool], max_in_flight: int) -> int:
    """Submit every item and collect every result; returns how many items were never submitted.

    submit(actor, item) -> ObjectRef; collect(item, actor_index, ref) -> True when the actor is gone
    for good (Ray's restarts exhausted). With every actor gone the remaining items are not
    submitted: the caller reports them (a rerun resumes them).
    """
    import ray

    alive = [True] * len(actors)
    busy = [0] * len(actors)
    pending: dict[Any, tuple[Any, int]] = {}
    queue = iter(items)
    left = 0
    exhausted = not actors
    if exhausted:
        left = sum(1 for _ in queue)
    while True:
        while not exhausted and len(pending) < max_in_flight and any(alive):
            item = next(queue, _END)
            if item is _END:
                exhausted = True
                break
            actor = min((k for k in range(len(actors)) if alive[k]), key=lambda k: busy[k])
            pending[submit(actors[actor], item)] = (item, actor)
            busy[actor] += 1
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            item, actor = pending.pop(ref)
            busy[actor] -= 1
            if collect(item, actor, ref):
                alive[actor] = False
    if not exhausted:
        left = sum(1 for _ in queue)
    return left


_END = object()
