"""A Ray Tune sweep over Deformable DETR settings, each trial a Ray Train run, stopped early by ASHA on val AP.

    ddetr tune --preset box_refine --data data/coco --samples 16 train.epochs=12        the packaged default space
    ddetr tune --preset tiny --data data/synth --space tune/spaces/tiny.yaml --samples 8 \\
        --max-concurrent 2 --name tiny_default --storage runs/tune data.scale=0.2 train.epochs=3 ...

Without `--space` a sweep searches the paper-scale space packaged with ddetr (`space.packaged_space()`,
ddetr/sweep/spaces/default.yaml: focal weight and alpha, 100 or 300 queries, the refinement variants, lr) around the
preset named by `--preset` (default deformable_detr).

Each trial is a driver function (`run_trial`) that builds and fits a `TorchTrainer` whose `TuneReportCallback`
forwards every epoch's metrics to Tune; `Tuner(trainer)` does not exist in Ray Train V2. The driver asks for 0.01
CPU, its Train workers for `train.cpus_per_worker` each, the Ray Data decode tasks for `data.map_cpus`.

How many trials run at once comes from `--max-concurrent`, else from what the cluster can grow to (the node types'
maxima: the cluster config Ray publishes, or the launcher YAML named by $DDETR_CLUSTER_CONFIG or found at
~/ray_bootstrap_config.yaml), and only on a fixed cluster from the CPUs up now; one decode task's CPUs are always
left free. An autoscaling cluster that starts empty therefore does not abort the sweep: its trials wait in
PENDING while nodes are added. On a cluster whose head offers the custom resource `ddetr_driver` (see
cluster/*.yaml), trial drivers are pinned to it, so a reclaimed spot node never takes a trial's driver with it.

The sweep lives in `<storage>/<name>/` (Tune's experiment folder) and each trial's Train run in
`<storage>/<name>/runs/<trial id>` (Ray Train continues a run by name, so a restarted trial resumes its run).
Running the same command again continues an interrupted sweep without redoing finished trials; the default name
carries a hash of the preset, data, space and overrides (`inputs.py`), so other inputs make a new sweep, and a named
sweep continued with other inputs is refused with the difference. At the end the folder also holds results.csv /
results.md (sorted by AP), ap_vs_params.png and best_config.json, which `ddetr train --config best_config.json`
trains.

Tune over Train needs Ray's dashboard (its State API): without it, trials stopped by ASHA leak their placement
groups and the sweep hangs. A local Ray is started with it; a cluster without it is refused at start.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator

from ddetr import io, ray_session
from ddetr.cluster import DRIVER_RESOURCE, cluster_maxima
from ddetr.config import Config, apply_overrides, build_config
from ddetr.sweep.asha import STATE_FILE, ResumableASHA, refuse_pickled_state
from ddetr.sweep.inputs import SweepInputs, check_inputs
from ddetr.sweep.options import add_arguments, to_argv
from ddetr.sweep.report import METRIC, plot_ap, trial_rows, write_best_config, write_table
from ddetr.sweep.space import load_space, packaged_space, param_space, trial_config
from ddetr.train import build_trainer, check_result

log = logging.getLogger("ddetr.sweep")

DRIVER_CPUS = 0.01  # a trial's driver only waits on its Train controller; Ray refuses 0

RUNS_DIR = "runs"  # under the sweep folder: one Train run per trial, named by trial id
ASHA_STATE = STATE_FILE  # ASHA's rungs (JSON), so that a continued sweep remembers them (asha.py)


@dataclass
class SweepSettings:
    """Everything about a sweep that is not the model config: where, how many, how stopped."""

    name: str
    storage: str  # absolute folder or URI holding the sweep folder
    samples: int = 4
    max_concurrent: int = 0  # 0: as many as fit the cluster
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    seed: int = 0

    @property
    def path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


class EpochReportCallback(TuneReportCallback):
    """Forward the Train run's reports that carry val/AP to Tune; drop the others.

    The one report without it is the non-finite-loss notice: Tune would end the whole sweep on a result missing its
    metric, so `run_trial` turns it into this trial's error instead.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable: fit one Ray Train run for the trial's config, named by the trial id."""
    cfg = trial_config(config)
    cfg.train.name = tune.get_context().get_trial_id()
    check_result(build_trainer(cfg, run_callbacks=[EpochReportCallback()]).fit())


def worker_cpus(cfg: Config) -> float:
    """CPUs a Train worker asks for: `train.cpus_per_worker`, 1 when it is left to the cluster (0)."""
    return float(cfg.train.cpus_per_worker) or 1.0


def concurrency(cfg: Config, cluster_cpus: float, requested: int = 0) -> int:
    """Trials that can run at once on `cluster_cpus` with one decode task's CPUs (`data.map_cpus`) always left free.

    Raises:
        ValueError: not even one trial fits; the message gives the CPU budget.
    """
    per_trial = DRIVER_CPUS + cfg.train.num_workers * worker_cpus(cfg)
    fit = math.floor((cluster_cpus - cfg.data.map_cpus) / per_trial + 1e-9)
    if fit < 1:
        raise ValueError(
            f"one trial needs {per_trial:g} CPUs (driver {DRIVER_CPUS} + train.num_workers {cfg.train.num_workers} x "
            f"train.cpus_per_worker {cfg.train.cpus_per_worker:g}) plus data.map_cpus {cfg.data.map_cpus:g} for its "
            f"data, but the cluster has {cluster_cpus:g}: lower train.cpus_per_worker or data.map_cpus"
        )
    if requested > fit:
        log.warning("%d trials at once would starve data tasks on %g CPUs; running %d", requested, cluster_cpus, fit)
    return min(requested, fit) if requested > 0 else fit


def sweep_concurrency(cfg: Config, requested: int = 0) -> int:
    """Trials at once: `requested` when given, else what the node types' maxima fit, else what is up now.

    Never derived from an empty autoscaling cluster's zero CPUs: with nothing to go on, one trial at a time.
    """
    maxima = cluster_maxima()
    if requested > 0 and maxima is None:
        return requested
    resources = maxima or ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    source = "the node types' maxima" if maxima else "the CPUs up now"
    try:
        n = concurrency(cfg, cpus, requested)
    except ValueError:
        if maxima:
            raise
        log.warning("the cluster has %g CPUs up and no node types to go by: 1 trial at a time, waiting for nodes", cpus)
        return max(requested, 1)
    if cfg.train.use_gpu == "true" and cfg.train.num_workers > 0:  # each trial's workers hold a GPU each
        gpus = resources.get("GPU", 0)
        n = max(1, min(n, int(gpus // cfg.train.num_workers)))
        log.info("%d trials at once (%s: %g CPUs, %g GPUs)", n, source, cpus, gpus)
        return n
    log.info("%d trials at once (%s: %g CPUs)", n, source, cpus)
    return n


def plan_trials(base: Config) -> Config:
    """The trials' inputs checked (`train.preflight`) and their resources decided once, before any trial starts, from
    what the cluster can become (a GPU per worker where it can add GPUs, checked on a GPU node: `ray_train.plan_run`).
    Unset workers are one per trial on GPUs, so that trials run side by side, one per GPU."""
    from ddetr.cluster import capacity
    from ddetr.train.preflight import check_data, check_init_from, check_pretrained_backbone
    from ddetr.train.ray_train import plan_run

    check_data(base)  # the user's mistakes, once for the sweep, before any trial starts
    check_init_from(base)
    check_pretrained_backbone(base)
    cap = capacity()
    gpus = base.train.use_gpu != "false" and cap.total.get("GPU", 0) > 0
    if base.train.num_workers < 0 and gpus:
        base = apply_overrides(base, ["train.num_workers=1"])
    return plan_run(base, cap)


def driver_resources() -> dict[str, float]:
    """What a trial's driver asks for: a little of the head's `ddetr_driver` when the cluster has it, else CPU."""
    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        return {"CPU": 0, DRIVER_RESOURCE: DRIVER_CPUS}
    return {"CPU": DRIVER_CPUS}


def build_tuner(base: Config, space: dict[str, dict[str, list]], settings: SweepSettings) -> tune.Tuner:
    """A new Tuner, or the interrupted one of `settings.path` restored (finished trials are kept as they are)."""
    trainable = tune.with_resources(run_trial, driver_resources())
    if tune.Tuner.can_restore(settings.path):
        log.info("continuing the sweep in %s", settings.path)
        return tune.Tuner.restore(settings.path, trainable=trainable, resume_errored=True)
    max_concurrent = sweep_concurrency(base, settings.max_concurrent)
    scheduler = ResumableASHA(
        io.join(settings.path, ASHA_STATE),
        time_attr="epoch",  # the Train run's own epoch: right even when a restarted trial resumes its run
        max_t=base.train.epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(base, space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            # The concurrency cap goes to the generator: Tune ignores max_concurrent_trials beside a given one.
            search_alg=BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent),
            num_samples=settings.samples,
        ),
        run_config=tune.RunConfig(name=settings.name, storage_path=settings.storage, verbose=1),
    )


def run_sweep(base: Config, space: dict[str, dict[str, list]], settings: SweepSettings) -> list[dict[str, Any]]:
    """Run (or continue) the sweep and write its results table, plot and best config; returns the table rows."""
    base = apply_overrides(base, [f"train.storage_path={settings.path}/{RUNS_DIR}"])
    if base.train.eval_every != 1:
        raise ValueError(
            f"train.eval_every must be 1 in a sweep (ASHA compares val/AP every epoch), got {base.train.eval_every}"
        )
    require_dashboard()
    base = plan_trials(base)
    results = build_tuner(base, space, settings).fit()
    rows = trial_rows(results, space, max_epochs=base.train.epochs)
    out = settings.path  # beside Tune's own files: a sweep in object storage keeps them there too
    write_table(rows, out)
    plot_ap(rows, space, io.join(out, "ap_vs_params.png"))
    best = io.join(out, "best_config.json")
    write_best_config(rows, best, name=f"{settings.name}_best", storage_path=settings.storage)
    return rows


def init_ray() -> None:
    """Join $RAY_ADDRESS's cluster (or the Ray already started in this process), passing the address on.

    Ray Train's placement-group cleaner asks the State API for "the" cluster; on a machine running several Ray
    instances it cannot tell which and stopped trials leak their placement groups, so every process of the sweep
    gets the address in its environment (the job's runtime environment). Trials' output stays in their logs.
    """
    if ray.is_initialized():
        return
    ray_session.join(os.environ["RAY_ADDRESS"], log_to_driver=False, pass_address=True)


def rerun_on_local_ray(argv: list[str]) -> int:
    """Start a local Ray with its dashboard, run this command again joined to it, then stop it.

    A job's runtime environment is fixed when its driver connects, and the address of a local Ray is known only
    once it runs: hence a second driver.
    """
    ray_session.start_local(log_to_driver=False)  # with its dashboard: Tune's trials need the State API
    try:
        env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        return subprocess.call([sys.executable, "-m", "ddetr.cli", "tune", *argv], env=env)
    finally:
        ray.shutdown()


def require_dashboard() -> None:
    """Fail fast when the State API (served by the dashboard) does not answer: the sweep would hang later."""
    from ray.util.state import list_placement_groups

    try:
        list_placement_groups(address=ray.get_runtime_context().gcs_address, limit=1, timeout=30)
    except Exception as e:  # noqa: BLE001 - any failure means no State API
        raise RuntimeError(
            "Tune over Ray Train needs the Ray dashboard (its State API cleans up stopped trials' placement groups); "
            "start Ray with ray[default] and include_dashboard=True / `ray start --head --include-dashboard=true`"
        ) from e


def main(argv: list[str] | None = None) -> int:
    """`python tune/sweep.py ARGS`: the same as `ddetr tune ARGS`."""
    argv = sys.argv[1:] if argv is None else argv
    p = add_arguments(argparse.ArgumentParser(prog="ddetr tune", description="Ray Tune sweep (ASHA on val/AP)"))
    return run(p.parse_args(argv))


def claim_sweep_folder(args: argparse.Namespace, space: dict[str, dict[str, list]]) -> tuple[str, str]:
    """The sweep's storage and name (by default `<preset>_<space>_<hash of the inputs>`, `inputs.py`), its folder
    checked before any Ray starts: no pickled ASHA state, the same inputs as when it started (recorded now if new).

    Raises:
        ConfigError: a pickled ASHA state file, or other inputs than the sweep in that folder was started with.
    """
    inputs = SweepInputs.of(args.preset, args.data, space, list(args.overrides))
    storage = io.absolute(args.storage)
    name = args.name or inputs.default_name(args.space)
    folder = f"{storage.rstrip('/')}/{name}"
    former = f"{args.preset}_{Path(args.space).stem}"  # the default name before it carried the inputs' hash
    if not args.name and tune.Tuner.can_restore(f"{storage.rstrip('/')}/{former}"):
        log.warning("a sweep begun under the former default name is in %s/%s: continue it with --name %s",
                    storage, former, former)  # fmt: skip
    refuse_pickled_state(folder)
    check_inputs(folder, inputs, has_sweep=tune.Tuner.can_restore(folder))
    return storage, name


def run(args: argparse.Namespace) -> int:
    """Run the sweep of parsed `ddetr tune` arguments (on a local Ray of its own when no cluster is given)."""
    args.space = args.space or str(packaged_space())  # its stem, "default", names the sweep as a file's would
    space = load_space(args.space)
    storage, name = claim_sweep_folder(args, space)
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        return rerun_on_local_ray(to_argv(args))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    base = build_config(args.preset, args.data, args.overrides)
    settings = SweepSettings(
        name=name,
        storage=storage,
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        seed=args.seed,
    )
    init_ray()
    rows = run_sweep(base, space, settings)
    out = settings.path
    print(io.read_text(io.join(out, "results.md")))
    print(f"{len(rows)} trials; results, plot and best config (ddetr train --config FILE) in {out}")
    return 0
