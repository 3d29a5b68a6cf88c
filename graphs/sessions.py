"""Sessions beyond start and resume (graphs/runner.py): where one stands, its checkpoint history,
forking a new session from any earlier checkpoint (time travel), and deleting one.

None of these load a model: they read the store and the SQLite checkpointer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from artloop.config import LoopConfig
from artloop.graphs.refine import build_graph, nodes_for
from artloop.graphs.runner import compiled, open_checkpointer, pending_pause, stored_loop
from artloop.store.trajectories import StoreError, TrajectoryStore, check_run_id, new_run_id
from langgraph.graph import START


def predecessors(loop: LoopConfig) -> dict[str, str]:
    """The node whose update leads to each node of `loop`'s variant (to re-enter the graph at a
    forked checkpoint); the iteration's first node and record are also reached from decide,
    which a later iteration comes from."""
    return {end: start for start, end in build_graph(loop).edges if end != "__end__"}


@dataclass
class SessionView:
    """Where a session stands: its stored run, what runs next, and the pending pause."""

    run_id: str
    status: str
    prompt: str
    iteration: int
    next: list[str]  # the step's nodes still to run (one whose writes were saved is not)
    unfinished: bool  # a step is under way: resuming continues it (even with `next` empty)
    pause: dict | None
    steps: list[dict]
    best_image: str | None
    best_score: float | None
    # The record of the step under way, from its checkpoint (at a pause: its prompt and the
    # agents' facts, critique and plan so far, which the store gets when the iteration ends).
    step: dict = field(default_factory=dict)


def _graph(saver: Any, run: dict) -> Any:
    """The graph of the loop variant `run` (a stored run) runs."""
    return compiled(saver, stored_loop(run))


def _thread(run_id: str, checkpoint_id: str | None = None) -> dict:
    configurable = {"thread_id": check_run_id(run_id)}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def view(store: TrajectoryStore, run_id: str) -> SessionView:
    """The session `run_id` as it stands (StoreError if unknown)."""
    run = store.get_run(run_id)
    with open_checkpointer(store) as saver:
        snapshot = _graph(saver, run).get_state(_thread(run_id))
    values = snapshot.values or {}
    pause = pending_pause(snapshot) if snapshot.next else None
    if not values and run["status"] == "paused":  # a server's session: its pause is stored
        pause = run["pause"]
    return SessionView(
        run_id=run_id,
        status=run["status"],
        prompt=run["prompt"],
        iteration=values.get("iteration", 0 if pause is None else pause["iteration"]),
        next=list(snapshot.next),
        unfinished=bool(snapshot.tasks),
        pause=pause,
        steps=run["steps"],
        best_image=values.get("best_image", run["final_image"]),
        best_score=values.get("best_score", run["best_score"]),
        step=values.get("step") or {},
    )


def history(store: TrajectoryStore, run_id: str) -> list[dict]:
    """The session's checkpoints, oldest first: id, iteration, the node that runs next."""
    run = store.get_run(run_id)
    with open_checkpointer(store) as saver:
        snapshots = list(_graph(saver, run).get_state_history(_thread(run_id)))
    return [
        {
            "checkpoint_id": s.config["configurable"]["checkpoint_id"],
            "index": i,
            "iteration": (s.values or {}).get("iteration", 0),
            "next": list(s.next),
            "created_at": s.created_at,
        }
        for i, s in enumerate(reversed(snapshots))
    ]


def fork(store: TrajectoryStore, run_id: str, checkpoint_id: str) -> str:
    """A new session that starts from `run_id` at `checkpoint_id`: its state then, and the
    iterations finished by then. The original is left as it is. Returns the new run id."""
    run = store.get_run(run_id)
    with open_checkpointer(store) as saver:
        graph = _graph(saver, run)
        snapshot = graph.get_state(_thread(run_id, checkpoint_id))
        if snapshot.values is None or not snapshot.next:
            raise StoreError(
                f"run {run_id} has no checkpoint {checkpoint_id} to fork from "
                f"(see `artloop session history {run_id}`)"
            )
        new_id = new_run_id()
        config = {
            **run["config"],
            "forked_from": {"run_id": run_id, "checkpoint_id": checkpoint_id},
        }
        store.create_run(new_id, run["prompt"], config, run["models"], run["prompts_version"])
        done = snapshot.values.get("iteration", 0)
        for step in run["steps"][:done]:  # the iterations finished before the fork point
            store.put_step(new_id, step["iteration"], step)
        # Re-enter the graph as if the node before the forked one had just written this state.
        loop, node = stored_loop(run), snapshot.next[0]
        first = nodes_for(loop)[1].__name__  # an iteration's: enhance, or compose
        as_node = (
            "decide" if done and node in (first, "record") else predecessors(loop).get(node, START)
        )
        graph.update_state(_thread(new_id), {**snapshot.values, "run_id": new_id}, as_node=as_node)
    store.finish_run(new_id, "interrupted")
    return new_id


def fork_iteration(store: TrajectoryStore, run_id: str, iteration: int) -> str:
    """`fork` from the start of `iteration` (0-based): the iterations before it kept, it and
    the rest to run again (the web UI's "fork from here"). Returns the new run id."""
    first = nodes_for(stored_loop(store.get_run(run_id)))[1].__name__
    for checkpoint in history(store, run_id):
        if checkpoint["iteration"] == iteration and checkpoint["next"] == [first]:
            return fork(store, run_id, checkpoint["checkpoint_id"])
    raise StoreError(f"run {run_id} has no start of iteration {iteration + 1} to fork from")


def delete(store: TrajectoryStore, run_id: str) -> None:
    """Remove a session: its stored trajectory and its checkpoints."""
    store.delete_run(run_id)
    with open_checkpointer(store) as saver:
        saver.delete_thread(check_run_id(run_id))
