"""The run's view of the cluster's nodes (DESIGN.md §12): which nodes it lost, where each component
ran, why each restart happened, and whether what is left still fits the run.

* ``NodeWatch`` polls Ray's node table (``ray.nodes()``, from the GCS: no dashboard needed) from the
  driver; a node that goes from alive to dead is a ``node_lost`` event, with the time it was seen.
* ``component_history`` reads ``RUN_DIR/processes.jsonl`` (every process start, with its node) and
  names each restart's reason: ``node lost`` when the process it replaced ran on a node that died
  before the new one started, ``process died`` otherwise.
* ``unplaceable`` packs the run's demands (``scrit.factory.run_demands``) onto the live nodes' total
  resources: what does not fit can never be scheduled there, so the run fails with a message that
  says so instead of waiting forever for Ray to place it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["NodeWatch", "component_history", "unplaceable"]

NODE_LOST = "node lost"
PROCESS_DIED = "process died"
# A node is seen dead a little after it died (the driver polls; Ray's health checks take seconds), so a
# restart that started up to this long before the death was seen is still the node's doing.
DEATH_SEEN_LATE_S = 30.0


class NodeWatch:
    """Ray's nodes, polled (see the module docstring). ``nodes``: id -> ``{"ip", "alive", "resources",
    "lost_at"}``; a node already dead when the watch starts has no ``lost_at``."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.poll()

    def poll(self) -> list[str]:
        """Read the node table; returns the ids of nodes newly seen dead."""
        import ray

        lost = []
        now = time.time()
        for entry in ray.nodes():
            node_id, alive = entry["NodeID"], bool(entry["Alive"])
            known = self.nodes.get(node_id)
            if known is None:
                known = self.nodes[node_id] = {"ip": entry.get("NodeManagerAddress", ""), "alive": alive,
                                               "resources": dict(entry.get("Resources") or {}), "lost_at": None}
            elif known["alive"] and not alive:
                lost.append(node_id)
                known["lost_at"] = now
            known["alive"] = alive
            if alive:
                known["resources"] = dict(entry.get("Resources") or {})
        return lost

    def name(self, node_id: str | None) -> str:
        """``IP/first 8 hex digits of the node id`` (nodes of one host share their IP)."""
        if not node_id:
            return "?"
        ip = self.nodes.get(node_id, {}).get("ip", "")
        return f"{ip}/{node_id[:8]}" if ip else node_id[:8]

    def capacities(self) -> list[dict[str, float]]:
        """The total resources of every live node."""
        return [dict(node["resources"]) for node in self.nodes.values() if node["alive"]]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Every node the run saw, by name: alive, lost at (epoch seconds) and its CPUs/GPUs."""
        return {self.name(node_id): {"alive": node["alive"], "lost_at": node["lost_at"],
                                     "cpus": node["resources"].get("CPU", 0.0), "gpus": node["resources"].get("GPU", 0.0)}
                for node_id, node in self.nodes.items()}


def component_history(records: dict[str, list[dict[str, Any]]], watch: NodeWatch,
                      started: float) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """``(placement, restarts)`` from ``process_records``: the node each component runs on now (its
    last start), and every restart, oldest first: ``{"component", "t" (seconds since ``started``),
    "reason", "from_node", "to_node", "pid"}``."""
    placement: dict[str, str] = {}
    restarts: list[dict[str, Any]] = []
    for component, starts in records.items():
        placement[component] = watch.name(starts[-1].get("node"))
        for before, after in zip(starts, starts[1:]):
            node = watch.nodes.get(before.get("node") or "", {})
            lost_at = node.get("lost_at")
            died_first = node and not node["alive"] and (lost_at is None or lost_at <= after["time"] + DEATH_SEEN_LATE_S)
            restarts.append({"component": component, "t": round(after["time"] - started, 1),
                             "reason": NODE_LOST if died_first else PROCESS_DIED,
                             "from_node": watch.name(before.get("node")), "to_node": watch.name(after.get("node")),
                             "pid": after["pid"]})
    return placement, sorted(restarts, key=lambda r: r["t"])


def unplaceable(demands: Sequence[tuple[str, dict[str, float]]],
                capacities: Sequence[dict[str, float]]) -> list[str]:
    """The components of ``demands`` that do not fit on ``capacities`` (total resources per node),
    packed largest first, each onto the first node with room (first-fit decreasing). Empty: it all fits.

    Ray places processes one by one too, so a run this finds room for can be placed; one it cannot
    place could at best be placed by a luckier packing, which Ray does not search for either."""
    free = [dict(node) for node in capacities]
    missing = []
    for name, need in sorted(demands, key=lambda d: (d[1].get("GPU", 0.0), d[1].get("CPU", 0.0)), reverse=True):
        for node in free:
            if all(node.get(kind, 0.0) + 1e-9 >= amount for kind, amount in need.items() if amount > 0):
                for kind, amount in need.items():
                    node[kind] = node.get(kind, 0.0) - amount
                break
        else:
            missing.append(name)
    return missing
