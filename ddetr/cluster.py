"""What an autoscaling cluster can grow to, as opposed to what is up now (an empty cluster has zero CPUs).

Sweeps size their concurrency and batch inference its actor pool from `cluster_maxima()`: the node types' resources
times their `max_workers`, from the cluster config Ray publishes (autoscaler v2, KubeRay) or a launcher YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Custom resource of the head node (cluster/*.yaml): sweep trial drivers asking for a little of it run there,
# where no spot reclaim ends them. Used when the cluster has it; a local Ray has not.
DRIVER_RESOURCE = "ddetr_driver"
CLUSTER_CONFIG_ENV = "DDETR_CLUSTER_CONFIG"  # a launcher YAML whose node types give the cluster's maxima
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # where the cluster launcher leaves it on the head


def node_type_maxima(config: Mapping[str, Any]) -> dict[str, float]:
    """{resource: total} over a launcher config's worker node types at their `max_workers` (the head's own
    resources excluded: it runs no trial workers), capped by the cluster's `max_workers`."""
    head = config.get("head_node_type")
    total: dict[str, float] = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        count = min(int(spec.get("max_workers", 0)), int(config.get("max_workers", spec.get("max_workers", 0))))
        for key, value in (spec.get("resources") or {}).items():
            total[key] = total.get(key, 0) + count * float(value)
    return total


def cluster_maxima() -> dict[str, float] | None:
    """The resources the cluster can grow to, or None when nothing says (a fixed cluster, a local Ray).

    Asks Ray first (the cluster config the autoscaler publishes, e.g. KubeRay's), then a launcher YAML:
    $DDETR_CLUSTER_CONFIG, else ~/ray_bootstrap_config.yaml on a cluster started by `ray up`.
    """
    from ray._private.state import state

    try:
        published = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: fall through to the files
        published = None
    if published and published.get("CPU"):
        return {k: float(v) for k, v in published.items()}
    path = os.environ.get(CLUSTER_CONFIG_ENV) or (str(BOOTSTRAP_CONFIG) if BOOTSTRAP_CONFIG.is_file() else "")
    if not path:
        return None
    import yaml

    maxima = node_type_maxima(yaml.safe_load(Path(path).read_text()) or {})
    return maxima if maxima.get("CPU") else None
