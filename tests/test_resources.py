"""What a training run asks for, decided from what the cluster can become (`ddetr/train/resources.py`)."""

from __future__ import annotations

import pytest

from ddetr.cluster import Capacity, NodeType
from ddetr.config import ConfigError, apply_overrides, get_preset
from ddetr.train.resources import check_fits, resolve_resources

TINY = get_preset("tiny")


def grows(*types: tuple[dict[str, float], int]) -> Capacity:
    return Capacity(tuple(NodeType(r, n) for r, n in types), can_grow=True)


def fixed(*nodes: dict[str, float]) -> Capacity:
    return Capacity(tuple(NodeType(r, 1) for r in nodes), can_grow=False)


def test_an_empty_autoscaling_gpu_cluster_gets_gpu_workers() -> None:
    cfg = resolve_resources(TINY, grows(({"CPU": 2, "GPU": 1}, 2)))
    assert (cfg.train.use_gpu, cfg.train.num_workers, cfg.train.cpus_per_worker) == ("true", 2, 1.0)
    check_fits(cfg, grows(({"CPU": 2, "GPU": 1}, 2)))


def test_workers_follow_the_gpus_up_to_a_cap_and_one_gpu_box_works() -> None:
    assert resolve_resources(TINY, fixed({"CPU": 16, "GPU": 1})).train.num_workers == 1
    assert resolve_resources(TINY, grows(({"CPU": 96, "GPU": 8}, 4))).train.num_workers == 8
    box = resolve_resources(TINY, fixed({"CPU": 16, "GPU": 1}))
    check_fits(box, fixed({"CPU": 16, "GPU": 1}))


def test_cpu_workers_leave_cpus_for_decoding_and_fit_on_one_node() -> None:
    cfg = resolve_resources(TINY, grows(({"CPU": 1}, 2)))  # two 1-CPU nodes, none up
    assert (cfg.train.use_gpu, cfg.train.num_workers, cfg.train.cpus_per_worker) == ("false", 2, 0.5)
    check_fits(cfg, grows(({"CPU": 1}, 2)))
    big = resolve_resources(TINY, grows(({"CPU": 4}, 10)))  # 40 CPUs, but a worker must fit on one node
    assert big.train.cpus_per_worker == 4
    local = resolve_resources(TINY, fixed({"CPU": 2}))  # this machine: as before, half a CPU each
    assert local.train.cpus_per_worker == 0.5


def test_explicit_settings_are_kept() -> None:
    cfg = apply_overrides(TINY, ["train.use_gpu=false", "train.num_workers=3", "train.cpus_per_worker=2"])
    out = resolve_resources(cfg, grows(({"CPU": 8, "GPU": 1}, 4)))
    assert (out.train.use_gpu, out.train.num_workers, out.train.cpus_per_worker) == ("false", 3, 2.0)


def test_refusals_name_the_setting_to_change() -> None:
    two = apply_overrides(TINY, ["train.use_gpu=true", "train.num_workers=2"])
    with pytest.raises(ConfigError, match=r"train.num_workers=2 with train.use_gpu=true needs 2 GPUs.*has 1: set "
                                          r"train.num_workers=1"):  # fmt: skip
        check_fits(resolve_resources(two, fixed({"CPU": 8, "GPU": 1})), fixed({"CPU": 8, "GPU": 1}))
    with pytest.raises(ConfigError, match="has no GPU: set train.use_gpu=auto or false"):
        check_fits(resolve_resources(two, fixed({"CPU": 8})), fixed({"CPU": 8}))
    wide = apply_overrides(TINY, ["train.num_workers=1", "train.cpus_per_worker=8"])
    with pytest.raises(ConfigError, match="train.cpus_per_worker=8, but the largest node.*has 4 CPUs"):
        check_fits(resolve_resources(wide, grows(({"CPU": 4}, 8))), grows(({"CPU": 4}, 8)))
    with pytest.raises(ConfigError, match="train.num_workers must be -1"):
        apply_overrides(TINY, ["train.num_workers=-2"])
