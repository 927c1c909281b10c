"""The run's view of the cluster's nodes (actors/nodes.py), without a cluster: restart reasons from
``processes.jsonl`` records, and the check that what a run needs still fits the nodes left."""

from __future__ import annotations

from scrit.actors.nodes import NODE_LOST, PROCESS_DIED, NodeWatch, component_history, unplaceable
from scrit.report import _placement_lines


class FakeWatch(NodeWatch):
    def __init__(self, nodes: dict) -> None:  # no Ray: the node table is given
        self.nodes = nodes


def test_unplaceable_packs_largest_first_onto_the_live_nodes() -> None:
    demands = [("engines", {"CPU": 0.6, "GPU": 0.0}), ("trainer.rank0", {"CPU": 0.5, "GPU": 0.0}),
               ("critic.0", {"CPU": 0.1, "GPU": 0.0})]
    assert unplaceable(demands, [{"CPU": 1.0}, {"CPU": 1.0}]) == []
    assert unplaceable(demands, [{"CPU": 1.0}]) == ["trainer.rank0"]  # 0.6 first, then 0.5 has no room
    assert unplaceable([("gpu", {"CPU": 0.0, "GPU": 1.0})], [{"CPU": 8.0}]) == ["gpu"]
    assert unplaceable([("state", {"CPU": 0.0, "GPU": 0.0})], [{}]) == []  # zero needs fit anywhere


def test_restarts_are_named_by_whether_the_old_process_node_died() -> None:
    watch = FakeWatch({"a" * 56: {"ip": "10.0.0.1", "alive": False, "resources": {}, "lost_at": 105.0},
                       "b" * 56: {"ip": "10.0.0.1", "alive": True, "resources": {}, "lost_at": None}})
    a, b = "a" * 56, "b" * 56
    records = {
        "trainer.rank0": [{"pid": 1, "time": 10.0, "node": a}, {"pid": 2, "time": 110.0, "node": b}],
        "critic.0": [{"pid": 3, "time": 10.0, "node": b}, {"pid": 4, "time": 50.0, "node": b}],
        "buffer": [{"pid": 5, "time": 10.0, "node": b}],
    }
    placement, restarts = component_history(records, watch, started=0.0)
    assert placement == {"trainer.rank0": f"10.0.0.1/{b[:8]}", "critic.0": f"10.0.0.1/{b[:8]}",
                         "buffer": f"10.0.0.1/{b[:8]}"}
    assert [(r["component"], r["reason"], r["t"]) for r in restarts] == [("critic.0", PROCESS_DIED, 50.0),
                                                                         ("trainer.rank0", NODE_LOST, 110.0)]
    assert restarts[1]["from_node"] == f"10.0.0.1/{a[:8]}"
    lines = "\n".join(_placement_lines({"placement": placement, "restart_log": restarts,
                                        "nodes": watch.summary()}))
    assert "## Where it ran" in lines and "lost: 10.0.0.1/aaaaaaaa" in lines
    assert f"| trainer.rank0 | 110.0 | {NODE_LOST} |" in lines


def test_a_call_lost_with_its_process_is_told_from_one_that_failed() -> None:
    """Evaluations lost with their evaluator, engine or node are asked again; a failing one is not."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    from scrit.actors.engines import EngineUnavailable
    from scrit.actors.run import _lost_process
    from scrit.actors.shells import StageFailed

    assert _lost_process(RayActorError())
    assert _lost_process(ActorUnavailableError("node gone", b"\0" * 16))
    assert _lost_process(EngineUnavailable("engines.0", "RayActorError: died"))
    assert not _lost_process(StageFailed("evaluator.0", "ValueError: bad prompt"))
    assert not _lost_process(ValueError("bad"))
