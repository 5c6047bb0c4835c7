"""What an autoscaling cluster can grow to, as opposed to what is up now (an empty cluster has zero CPUs).

Training, sweeps, batch inference and Serve plan from `capacity()`: the node types the cluster can add (from the
cluster config Ray publishes: autoscaler v2, KubeRay; or a launcher YAML), each with its resources and how many of it
may run, and only on a fixed cluster (a local Ray, nodes started by hand) from the nodes up now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Custom resource of the head node (cluster/*.yaml): sweep trial drivers asking for a little of it run there,
# where no spot reclaim ends them. Used when the cluster has it; a local Ray has not.
DRIVER_RESOURCE = "ddetr_driver"
CLUSTER_CONFIG_ENV = "DDETR_CLUSTER_CONFIG"  # a launcher YAML whose node types give the cluster's maxima
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # where the cluster launcher leaves it on the head
UNBOUNDED = 1_000  # stands for a node group without a maximum (KubeRay's maxReplicas unset)


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster runs or can add: its resources ({"CPU": 8, "GPU": 1, ...}) and how many of it."""

    resources: dict[str, float]
    count: int


@dataclass(frozen=True)
class Capacity:
    """The nodes a run can plan on. `can_grow`: they are node types an autoscaler adds on demand (none may be up
    yet), rather than the nodes up now."""

    node_types: tuple[NodeType, ...]
    can_grow: bool

    @property
    def total(self) -> dict[str, float]:
        """{resource: amount} over every node at its count."""
        total: dict[str, float] = {}
        for node in self.node_types:
            for key, value in node.resources.items():
                total[key] = total.get(key, 0.0) + node.count * value
        return total

    def largest(self, resource: str, on: str | None = None) -> float:
        """The most of `resource` one node offers (among the nodes that offer some of `on`, when given)."""
        return max(
            (
                n.resources.get(resource, 0.0)
                for n in self.node_types
                if n.count > 0 and (on is None or n.resources.get(on))
            ),
            default=0.0,
        )

    def describe(self) -> str:
        """Where the numbers come from, for messages: "the node types' maxima" or "the nodes up now"."""
        return "the node types' maxima" if self.can_grow else "the nodes up now"


def node_types_of_config(config: Mapping[str, Any]) -> list[NodeType]:
    """A launcher config's worker node types at their `max_workers` (the head excluded: it runs no training workers),
    each capped by the cluster's `max_workers`."""
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    found = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        count = int(spec.get("max_workers", 0))
        count = min(count, int(cap)) if cap is not None else count
        found.append(NodeType({k: float(v) for k, v in (spec.get("resources") or {}).items()}, count))
    return found


def node_type_maxima(config: Mapping[str, Any]) -> dict[str, float]:
    """{resource: total} over a launcher config's worker node types at their `max_workers` (see
    `node_types_of_config`)."""
    return Capacity(tuple(node_types_of_config(config)), can_grow=True).total


def published_node_types() -> list[NodeType] | None:
    """The node groups of the cluster config the autoscaler publishes in the GCS (v2, KubeRay), or None."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: fall through to the files
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(
            {k: float(v) for k, v in group.resources.items()}, UNBOUNDED if group.max_count < 0 else group.max_count
        )
        for group in config.node_group_configs
    ]


def autoscaling_node_types() -> list[NodeType] | None:
    """The node types an autoscaler can add, or None when nothing says (a fixed cluster, a local Ray).

    Asks Ray first (the cluster config the autoscaler publishes, e.g. KubeRay's), then a launcher YAML:
    $DDETR_CLUSTER_CONFIG, else ~/ray_bootstrap_config.yaml on a cluster started by `ray up`.
    """
    published = published_node_types()
    if published and Capacity(tuple(published), True).total.get("CPU"):
        return published
    path = os.environ.get(CLUSTER_CONFIG_ENV) or (str(BOOTSTRAP_CONFIG) if BOOTSTRAP_CONFIG.is_file() else "")
    if not path:
        return None
    import yaml

    found = node_types_of_config(yaml.safe_load(Path(path).read_text()) or {})
    return found if Capacity(tuple(found), True).total.get("CPU") else None


def cluster_maxima() -> dict[str, float] | None:
    """The resources the cluster can grow to, or None when nothing says (a fixed cluster, a local Ray)."""
    found = autoscaling_node_types()
    return Capacity(tuple(found), can_grow=True).total if found else None


def capacity() -> Capacity:
    """The node types of an autoscaling cluster, else the alive nodes of the connected Ray (one type each)."""
    found = autoscaling_node_types()
    if found:
        return Capacity(tuple(found), can_grow=True)
    import ray

    alive = [NodeType({k: float(v) for k, v in node["Resources"].items()}, 1) for node in ray.nodes() if node["Alive"]]
    return Capacity(tuple(alive), can_grow=False)
