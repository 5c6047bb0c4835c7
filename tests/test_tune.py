"""tune/: search-space files offline; then a real sweep of the tiny model on tiny synthetic data (Ray, dashboard on).

One sweep, shared by the Ray tests, runs `python tune/sweep.py` in a subprocess joined to the suite's Ray
(`ray_local`, dashboard on) through RAY_ADDRESS: that is the command users run, it can be killed to interrupt the
sweep, and it passes the cluster's address to Ray Train's placement-group cleaner, which cannot pick a cluster on a
machine running several."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddetr.config import Config, ConfigError, apply_overrides, get_preset
from ddetr.sweep.space import load_space, param_space, to_overrides, trial_config

REPO = Path(__file__).resolve().parents[1]
SWEEP_TIMEOUT_S = 480  # a 4-trial sweep takes ~3 min on an idle 2-core machine; a hang is otherwise silent
EPOCHS = 2  # of 24 steps: 48 images, batch 2
TINY = [
    "data.scale=0.2",
    "train.num_workers=1",
    "train.cpus_per_worker=0.5",
    f"train.epochs={EPOCHS}",
    "data.map_cpus=0.5",
]
TEST_SPACE = REPO / "tests" / "data" / "asha_space.yaml"


# ---- offline ---------------------------------------------------------------------------------------------------


def test_default_space_loads_and_maps_refinement(tmp_path: Path) -> None:
    space = load_space(REPO / "tune" / "spaces" / "default.yaml")
    assert {"loss.cls_loss_coef", "loss.focal_alpha", "model.num_queries", "refinement"} <= set(space)
    params = param_space(get_preset("tiny"), space)
    assert params["model"]["d_model"] == 64 and "refinement" in params
    sampled = get_preset("tiny").to_dict()
    expected = {"none": (False, False), "box_refine": (True, False), "two_stage": (True, True)}
    for name, flags in expected.items():
        cfg = trial_config({**sampled, "refinement": name})
        assert (cfg.model.with_box_refine, cfg.model.two_stage) == flags
    direct = {**sampled, "model": {**sampled["model"], "two_stage": True, "with_box_refine": False}}
    with pytest.raises(ConfigError, match="with_box_refine"):  # the pairing rule lives in ModelConfig alone
        trial_config(direct)


def test_space_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss.focal_gamma: {uniform: [1, 3]}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: key 'loss.focal_gamma' is not a config field"):
        load_space(bad)
    bad.write_text("loss.focal_alpha: {normal: [0.2, 0.1]}\n")
    with pytest.raises(ValueError, match="focal_alpha"):
        load_space(bad)
    bad.write_text("refinement: {choice: [none, cascade]}\n")
    with pytest.raises(ValueError, match="refinement takes"):
        load_space(bad)


def test_overrides_round_trip() -> None:
    base = get_preset("tiny")
    cfg = apply_overrides(base, ["loss.focal_alpha=0.3", "model.two_stage=true", "model.with_box_refine=true"])
    assert apply_overrides(base, to_overrides(cfg, base)) == cfg


def test_concurrency_leaves_room_for_data_tasks() -> None:
    from ddetr.sweep.driver import concurrency

    cfg = apply_overrides(get_preset("tiny"), ["train.num_workers=1", "train.cpus_per_worker=0.5"])
    assert concurrency(cfg, 2.0) == 2  # 2 x 0.51 + 0.5 for decoding <= 2
    assert concurrency(cfg, 2.0, requested=4) == 2
    assert concurrency(cfg, 2.0, requested=1) == 1
    with pytest.raises(ValueError, match="cpus_per_worker"):
        concurrency(apply_overrides(cfg, ["train.cpus_per_worker=2"]), 2.0)


def test_concurrency_comes_from_the_node_types_not_from_the_nodes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An autoscaling cluster that starts empty has 0 CPUs up: the node types' maxima size the sweep instead.
    from ddetr.cluster import node_type_maxima
    from ddetr.sweep.driver import sweep_concurrency

    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0, "ddetr_driver": 100}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 2}, "max_workers": 2},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4},  # capped by the cluster's 3
        },
    }
    assert node_type_maxima(config) == {"CPU": 4 + 24, "GPU": 3}
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    monkeypatch.setenv("DDETR_CLUSTER_CONFIG", str(path))
    cfg = apply_overrides(get_preset("tiny"), ["train.num_workers=2", "train.cpus_per_worker=4"])
    assert sweep_concurrency(cfg) == 3  # (28 - 0.5 for data) // 8.01
    assert sweep_concurrency(cfg, requested=2) == 2
    with pytest.raises(ValueError, match="cpus_per_worker"):  # a trial bigger than the whole cluster can grow
        sweep_concurrency(apply_overrides(cfg, ["train.cpus_per_worker=20"]))


def test_asha_rungs_survive_a_restored_sweep(tmp_path: Path) -> None:
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ddetr.sweep.asha import ResumableASHA

    asha = ResumableASHA(
        tmp_path / "asha_state.json", time_attr="epoch", metric="val/AP", mode="max", max_t=2, grace_period=1,
        reduction_factor=2,
    )  # fmt: skip
    pristine = pickle.dumps(asha)  # what Tune keeps in the sweep folder: the scheduler as the sweep started
    first, late = SimpleNamespace(trial_id="first"), SimpleNamespace(trial_id="late")
    asha.on_trial_add(None, first)
    assert asha.on_trial_result(None, first, {"epoch": 1, "val/AP": 0.02}) == TrialScheduler.CONTINUE

    def behind_after_restore(scheduler: ResumableASHA) -> str:
        scheduler.on_trial_add(None, late)
        return scheduler.on_trial_result(None, late, {"epoch": 1, "val/AP": 0.001})

    assert behind_after_restore(pickle.loads(pristine)) == TrialScheduler.STOP
    forgetful = pickle.loads(pristine)
    forgetful._state_file = str(tmp_path / "missing.json")  # Tune's own restore: empty rungs, nothing to compare
    assert behind_after_restore(forgetful) == TrialScheduler.CONTINUE


def test_a_sweeps_default_name_follows_its_inputs_and_a_named_one_keeps_them(tmp_path: Path, capsys) -> None:
    from ddetr import cli
    from ddetr.sweep.inputs import INPUTS_FILE, SweepInputs, check_inputs

    space = load_space(TEST_SPACE)

    def inputs(*overrides: str, data: str = "data/synth") -> SweepInputs:
        return SweepInputs.of("tiny", data, space, list(overrides))

    base = inputs("train.epochs=2", "data.scale=0.2")
    assert base.default_name(TEST_SPACE) == f"tiny_asha_space_{base.digest()}" and len(base.digest()) == 6
    assert inputs("data.scale=0.2", "train.epochs=2").default_name(TEST_SPACE) == base.default_name(TEST_SPACE)
    assert inputs("train.epochs=3", "data.scale=0.2").default_name(TEST_SPACE) != base.default_name(TEST_SPACE)
    assert inputs("train.epochs=2", "data.scale=0.2", data="other").digest() != base.digest()

    folder = str(tmp_path / "tune" / "named")
    check_inputs(folder, base, has_sweep=False)  # a new sweep: its inputs recorded
    check_inputs(folder, inputs("data.scale=0.2", "train.epochs=2"), has_sweep=True)  # the same: continued
    with pytest.raises(ConfigError, match=r"override train.epochs: 2 then, 3 now; override train.lr: unset then"):
        check_inputs(folder, inputs("train.epochs=3", "data.scale=0.2", "train.lr=1e-3"), has_sweep=True)

    # The command line refuses it before any Ray starts (Tune's tuner.pkl marks the folder as holding a sweep; it
    # is never read here).
    Path(folder, "tuner.pkl").write_bytes(b"")
    argv = ["tune", "--data", "data/synth", "--space", str(TEST_SPACE), "--name", "named", "--storage",
            str(tmp_path / "tune"), "data.scale=0.2", "train.epochs=4"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the sweep in {folder} was started with other inputs"), err
    assert f"override train.epochs: 2 then, 4 now; see {Path(folder, INPUTS_FILE)}" in err[0]


# ---- sweeps on Ray ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ddetr.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("tune_data")
    make_synthetic_coco(str(root), 48, 8, seed=0, image_size=(64, 96))
    return root


def sweep_command(data: Path, storage: Path, name: str, samples: int, max_concurrent: int) -> list[str]:
    return [
        sys.executable, str(REPO / "tune" / "sweep.py"), "--preset", "tiny", "--data", str(data),
        "--space", str(TEST_SPACE), "--samples", str(samples),
        "--max-concurrent", str(max_concurrent), "--name", name, "--storage", str(storage), *TINY,
    ]  # fmt: skip


def sweep_env(ray_local) -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def read_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(
    ray_local, hard_timeout, synth_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, int]]:
    """A 4-trial ASHA sweep, 2 trials at a time, killed (SIGKILL of its driver) once a trial has finished, then
    continued by running the same command again. Returns the sweep folder and {trial id: reports} of the trials
    finished before the kill."""
    with hard_timeout(2 * SWEEP_TIMEOUT_S + 60):
        storage = tmp_path_factory.mktemp("tune_runs")
        cmd = sweep_command(synth_data, storage, "asha", samples=2, max_concurrent=2)  # x 2 learning rates
        env = dict(sweep_env(ray_local), TUNE_GLOBAL_CHECKPOINT_S="1")  # save Tune's state every second
        folder = storage / "asha"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + SWEEP_TIMEOUT_S
            finished: dict[str, int] = {}
            while not finished and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(1)
                finished = _terminated_trials(folder)
            assert finished, "no trial finished before the deadline"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its children, mid-sweep
            proc.wait()
        assert not (folder / "results.csv").exists(), "the sweep ended before it could be interrupted"
        # The killed driver's trials give their CPUs back once Ray has cleaned its job up; the continued sweep starts
        # after that (up to 60 s), as a user's would on a cluster, instead of its data tasks finding no CPU.
        total = ray_local.cluster_resources().get("CPU", 0)
        settle = time.monotonic() + 60
        while ray_local.available_resources().get("CPU", 0) < total and time.monotonic() < settle:
            time.sleep(0.5)

        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return folder, finished


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_writes_a_sorted_table_and_a_plot(sweep: tuple[Path, dict[str, int]]) -> None:
    folder, _ = sweep
    rows = read_rows(folder)
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped") for r in rows)
    aps = [float(r["AP"]) for r in rows]
    assert aps == sorted(aps, reverse=True)
    assert all(1 <= int(r["epochs"]) <= EPOCHS for r in rows)
    assert {r["refinement"] for r in rows} <= {"none", "box_refine", "two_stage"}
    assert (folder / "results.md").read_text().startswith("| trial | AP |")
    assert (folder / "ap_vs_params.png").stat().st_size > 1000


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_trials_behind_at_the_first_rung(sweep: tuple[Path, dict[str, int]]) -> None:
    # ASHA (grace 1, factor 2) stops a trial at epoch 1 when its AP is below the median of the APs recorded at
    # that rung before it. The grid alternates the learning rate (trials 0 and 2 at 1e-3, AP ~0.02; 1 and 3 at
    # 1e-6, AP 0), and two trials run at a time, so trial 3 starts only once trials 0 and 1 have passed the rung:
    # it meets the median of an AP above 0 and its own 0, and is stopped, whatever the order of the others.
    folder, _ = sweep
    rows = read_rows(folder)
    epoch1 = {r["trial"]: _epoch_ap(folder, r["trial"], 1) for r in rows}
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, f"ASHA stopped no trial; APs at epoch 1: {epoch1}"
    assert all(int(r["epochs"]) < EPOCHS and epoch1[r["trial"]] < max(epoch1.values()) for r in stopped)
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(int(r["epochs"]) == EPOCHS for r in finished)


@pytest.mark.ray
@pytest.mark.slow
def test_continued_sweep_did_not_rerun_finished_trials(sweep: tuple[Path, dict[str, int]]) -> None:
    folder, finished = sweep
    assert {r["trial"] for r in read_rows(folder)} >= set(finished)
    for trial, reports in finished.items():
        assert _reports(folder, trial) == reports, f"trial {trial} finished before the interruption but ran again"
        assert len(list((folder / "runs" / trial).glob("checkpoint_*"))) >= 1  # its Train run, named by trial id
    assert (folder / "asha_state.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_best_config_file_trains(sweep: tuple[Path, dict[str, int]], tmp_path: Path, hard_timeout) -> None:
    folder, _ = sweep
    best_row = read_rows(folder)[0]
    best = Config.from_dict(json.loads((folder / "best_config.json").read_text()))
    assert best.train.name == "asha_best" and best.model.num_classes == 5
    assert best.model.num_queries == int(best_row["model.num_queries"])
    assert math.isclose(best.loss.focal_alpha, float(best_row["loss.focal_alpha"]), rel_tol=1e-3)
    assert best.model.two_stage == (best_row["refinement"] == "two_stage")
    from ddetr.train import train

    with hard_timeout(180):
        local = apply_overrides(
            best, ["train.epochs=1", "train.max_steps_per_epoch=1", f"train.storage_path={tmp_path}",
                   "data.val=", "data.loader_workers=0"]
        )  # fmt: skip
        metrics = train(local, engine="local")
    assert metrics["step"] == 1 and math.isfinite(metrics["train/loss"])


def _trial_dir(sweep: Path, trial: str) -> Path:
    # A trial that was running when the sweep was killed starts again in a new folder after the restore (the
    # name ends in its start time): the newest folder holds its results.
    found = sorted(p for p in sweep.iterdir() if p.is_dir() and trial in p.name and (p / "result.json").exists())
    assert found, f"no result folder for trial {trial} in {sweep}"
    return found[-1]


def _reports(sweep: Path, trial: str) -> int:
    return len((_trial_dir(sweep, trial) / "result.json").read_text().splitlines())


def _epoch_ap(sweep: Path, trial: str, epoch: int) -> float:
    for line in (_trial_dir(sweep, trial) / "result.json").read_text().splitlines():
        result = json.loads(line)
        if result.get("epoch") == epoch:
            return result["val/AP"]
    raise AssertionError(f"trial {trial} reported no epoch {epoch}")


def _terminated_trials(sweep: Path) -> dict[str, int]:
    """trial id -> reports, for the trials Tune's saved experiment state records as finished."""
    out = {}
    for state in sweep.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):
            continue
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                out[trial["trial_id"]] = _reports(sweep, trial["trial_id"])
    return out
