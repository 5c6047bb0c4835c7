"""The plain training engine: the optimisation recipe, gradient accumulation, the non-finite-loss stop, and
resuming a run from a mid-epoch checkpoint. No Ray; the tiny preset on a few synthetic images."""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import pytest
import torch

from ddetr.config import Config, apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.models import build_model
from ddetr.train import loop
from ddetr.train.checkpoints import STATE_FILE, TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from ddetr.train.engine import NonFiniteLossError, train_step
from ddetr.train.local import LocalRuntime
from ddetr.train.logbook import read_metrics
from ddetr.train.optim import build_optimizer, build_scheduler, param_groups


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, a second one that competes with other processes makes
    these tiny steps many times slower (measured up to 40x), and both runs of a comparison use the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    paths = make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 16, 0, seed=0, image_size=(64, 96))
    return paths.train_shards


def tiny_config(train_shards: str, storage: Path, name: str, *overrides: str) -> Config:
    """The tiny preset at a tenth of the paper's image sizes, one process, no validation."""
    return apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={train_shards}",
            "data.scale=0.1",
            "data.loader_workers=0",
            f"train.storage_path={storage}",
            f"train.name={name}",
            "train.log_every=1000",
            *overrides,
        ],
    )


def run_local(cfg: Config, runtime_type: type[LocalRuntime] = LocalRuntime) -> dict:
    runtime = runtime_type(cfg, device="cpu")
    try:
        return loop.fit(cfg, runtime)
    finally:
        runtime.close()


# --- the optimisation recipe ------------------------------------------------------------------------------------


def test_param_groups_follow_the_recipe():
    # With ImageNet weights (not fetched here) the stem and layer1 are frozen; `tiny` alone starts from random ones.
    cfg = apply_overrides(get_preset("tiny"), ["model.pretrained_backbone=imagenet"])
    model, _, _ = build_model(cfg, load_backbone_weights=False)
    groups = param_groups(model, cfg.train)
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    assert {g["name"]: g["lr"] for g in groups} == {
        "main": cfg.train.lr,
        "backbone": cfg.train.lr_backbone,
        "linear_proj": pytest.approx(cfg.train.lr * 0.1),
    }
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "the backbone's stem and first stage are frozen in the recipe"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of, f"frozen {name} is in an optimizer group"
        elif name.startswith("backbone.0."):
            assert group_of[id(p)] == "backbone", name
        elif "sampling_offsets" in name or "reference_points" in name:
            assert group_of[id(p)] == "linear_proj", name
        else:
            assert group_of[id(p)] == "main", name
    # Every trainable parameter is in exactly one group.
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(group_of) == trainable


def test_scheduler_drops_every_lr_tenfold_at_lr_drop():
    cfg = apply_overrides(get_preset("tiny"), ["train.lr_drop=2"])
    model, _, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    base = [g["lr"] for g in optimizer.param_groups]
    per_epoch = []
    for _ in range(4):
        per_epoch.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: changes nothing, but keeps the scheduler's call-order check quiet
        scheduler.step()  # stepped once per epoch, at its end
    assert per_epoch[0] == per_epoch[1] == base
    assert per_epoch[2] == per_epoch[3] == pytest.approx([lr * 0.1 for lr in base])


def test_fused_adamw_takes_the_steps_of_the_per_tensor_loop():
    """On a CPU the recipe's AdamW is the fused kernel; three steps of it match torch's reference loop."""
    cfg = get_preset("tiny")
    fused_model, _, _ = build_model(cfg)
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, cfg.train)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(param_groups(loop_model, cfg.train), weight_decay=cfg.train.weight_decay, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
        fused.step()
        loop.step()
    moved = 0
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += a.requires_grad
    assert moved > 100


# --- gradient accumulation -------------------------------------------------------------------------------------


class RecordGrads(torch.optim.Optimizer):
    """An optimizer whose step only keeps a copy of every gradient."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.0})
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None) -> None:
        self.grads = {
            str(i): p.grad.detach().clone()
            for i, p in enumerate(p for g in self.param_groups for p in g["params"])
            if p.grad is not None
        }


def synthetic_batch(images: torch.Tensor, targets: list[dict]) -> dict:
    mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
    return {"images": images, "mask": mask, "targets": targets}


def test_accumulated_gradient_equals_the_large_batch_gradient():
    """Two micro-batches of 2, normalised by the group's box count, give the gradient of one batch of 4.

    Equal image sizes (no padding), frozen batch norm and no dropout make each image's outputs independent of
    its batch; float64 leaves only summation order between the two.
    """
    cfg = get_preset("tiny")
    model, criterion, _ = build_model(cfg)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 48, generator=g, dtype=torch.float64)
    targets = []
    for n in (1, 3, 2, 4):  # unequal box counts: the normaliser must be the group's, not each micro-batch's
        centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
        targets.append({"boxes": torch.cat([centre, size], 1), "labels": torch.randint(1, 5, (n,), generator=g)})

    def gradient(micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        trained = copy.deepcopy(model)
        recorder = RecordGrads([p for p in trained.parameters() if p.requires_grad])
        train_step(trained, criterion, micro_batches, recorder, device=torch.device("cpu"), max_norm=0.0)
        return recorder.grads

    large = gradient([synthetic_batch(images, targets)])
    accumulated = gradient([synthetic_batch(images[:2], targets[:2]), synthetic_batch(images[2:], targets[2:])])
    assert large.keys() == accumulated.keys() and len(large) > 0
    for k in large:
        torch.testing.assert_close(accumulated[k], large[k], rtol=1e-9, atol=1e-12)
    # And not trivially: one micro-batch alone has another gradient.
    half = gradient([synthetic_batch(images[:2], targets[:2])])
    assert any(not torch.allclose(half[k], large[k]) for k in large)


# --- the non-finite-loss stop ----------------------------------------------------------------------------------


class RecordingRuntime(LocalRuntime):
    """A LocalRuntime that remembers the hash of every checkpoint it writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hashes: dict[str, str] = {}

    def report(self, metrics, checkpoint_dir) -> None:
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            latest = list_checkpoints(self.dir)[-1]
            self.hashes[latest.name] = hashlib.sha256((latest / STATE_FILE).read_bytes()).hexdigest()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    cfg = tiny_config(
        shards, tmp_path, "nan", "train.epochs=1", "train.checkpoint_every_steps=1", "train.keep_checkpoints=5"
    )
    build = loop.build_model

    def poisoned_build_model(cfg: Config, **kwargs):
        model, criterion, postprocessors = build(cfg, **kwargs)
        forward, calls = criterion.forward, []

        def forward_nan_on_third_call(outputs, targets, num_boxes=None):
            losses = forward(outputs, targets, num_boxes=num_boxes)
            calls.append(1)
            if len(calls) == 3:
                losses["loss_bbox"] = losses["loss_bbox"] * math.nan
            return losses

        criterion.forward = forward_nan_on_third_call
        return model, criterion, postprocessors

    monkeypatch.setattr(loop, "build_model", poisoned_build_model)
    runtime = RecordingRuntime(cfg, device="cpu")
    with pytest.raises(NonFiniteLossError) as err:
        try:
            loop.fit(cfg, runtime)
        finally:
            runtime.close()
    message = str(err.value)
    # The message names where and carries every loss term of the step.
    assert "epoch 0, optimizer step 3" in message and "loss_bbox=nan" in message and "loss=nan" in message
    for term in ("loss_ce", "loss_giou", "loss_bbox_0", "class_error"):
        assert f"{term}=" in message
    # The checkpoints of steps 1 and 2 are there, untouched; nothing of step 3.
    checkpoints = list_checkpoints(runtime.dir)
    assert [p.name for p in checkpoints] == ["checkpoint_00000001", "checkpoint_00000002"]
    for p in checkpoints:
        assert hashlib.sha256((p / STATE_FILE).read_bytes()).hexdigest() == runtime.hashes[p.name]
    last = load_checkpoint(checkpoints[-1])
    assert last["state"].step == 2 and last["state"].batches_done == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert [r["step"] for r in read_metrics(runtime.dir) if r["kind"] == "step" and "loss" in r] == [1, 2]


# --- resuming --------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupting_runtime(at_step: int) -> type[LocalRuntime]:
    class InterruptedRuntime(LocalRuntime):
        """Dies right after the checkpoint of step `at_step` is in place, as a killed process would."""

        def report(self, metrics, checkpoint_dir) -> None:
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir is not None and metrics.get("step") == at_step:
                raise Interrupted

    return InterruptedRuntime


RESUME_OVERRIDES = (
    "train.epochs=2",
    "train.lr_drop=1",  # the learning rate drops between the epochs: the scheduler's state must survive
    "train.max_steps_per_epoch=2",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=1",
    "model.dropout=0.1",  # dropout draws from the generators: a resumed run must draw what the straight one drew
)


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory) -> dict:
    cfg = tiny_config(shards, tmp_path_factory.mktemp("runs"), "straight", *RESUME_OVERRIDES)
    run_local(cfg)
    runtime = LocalRuntime(cfg, device="cpu")
    final = load_checkpoint(runtime.latest_checkpoint())
    runtime.close()
    return final


@pytest.mark.parametrize("stop_at", [1, 3], ids=["mid-epoch-0", "mid-epoch-1"])
def test_resumed_run_equals_the_straight_run(shards, tmp_path, straight_run, stop_at):
    """k steps, a checkpoint, a crash, a new `fit` on the same run folder, then the rest: the same weights."""
    cfg = tiny_config(shards, tmp_path, "resumed", *RESUME_OVERRIDES)
    with pytest.raises(Interrupted):
        run_local(cfg, interrupting_runtime(stop_at))
    stopped = load_checkpoint(list_checkpoints(tmp_path / "resumed")[-1])
    assert stopped["state"].step == stop_at and stopped["state"].batches_done == 1
    run_local(cfg)

    runtime = LocalRuntime(cfg, device="cpu")
    resumed = load_checkpoint(runtime.latest_checkpoint())
    runtime.close()
    assert vars(resumed["state"]) | {"metrics": {}} == vars(straight_run["state"]) | {"metrics": {}}
    assert resumed["state"].step == 4 and resumed["state"].epoch == 2
    assert resumed["scheduler"] == straight_run["scheduler"]
    assert resumed["model"].keys() == straight_run["model"].keys()
    for k, v in straight_run["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    for i, s in straight_run["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][i], s, rtol=1e-6, atol=1e-9)
    # The step counter went on from the checkpoint: the resumed process logged steps stop_at+1 .. 4, once each.
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "step" and "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_resuming_at_the_end_of_a_cut_short_epoch_trains_no_extra_step(shards, tmp_path):
    """A checkpoint taken after the last step of a cut-short epoch, before the epoch's own: resuming from it
    finishes the epoch without another step."""
    cfg = tiny_config(shards, tmp_path, "edge", "train.epochs=1", "train.max_steps_per_epoch=2")
    run = loop.Training(cfg, torch.device("cpu"))
    run.state = TrainState(step=2, batches_done=2, images_done=4)
    save_checkpoint(tmp_path / "at-step-2", run.payload(cfg.to_dict()), {})
    runtime = LocalRuntime(cfg, device="cpu", resume=str(tmp_path / "at-step-2"))
    try:
        metrics = loop.fit(cfg, runtime)
    finally:
        runtime.close()
    assert not any(k.startswith("train/") for k in metrics) and metrics["step"] == 2
    final = load_checkpoint(list_checkpoints(tmp_path / "edge")[-1])
    assert final["state"].step == 2 and final["state"].epoch == 1
    assert [r for r in read_metrics(tmp_path / "edge") if r["kind"] == "step"] == []


def test_fp16_trains_through_a_grad_scaler_whose_state_is_resumed(shards, tmp_path):
    """fp16 autocast (on the CPU here) scales the loss. The scaler starts at 2**16, where the tiny model's gradients
    overflow: it skips those steps and halves its scale until they fit, then steps. Its state (scale, growth
    tracker) is checkpointed: a run interrupted after step 6, once the scaler has settled, ends where the straight
    run ends, scaler included (one that restarted at 2**16 would skip steps again)."""
    overrides = ("train.amp=fp16", "train.epochs=1", "train.max_steps_per_epoch=8", "train.checkpoint_every_steps=1")
    straight_cfg = tiny_config(shards, tmp_path, "fp16-straight", *overrides)
    run_local(straight_cfg)
    straight = load_checkpoint(list_checkpoints(tmp_path / "fp16-straight")[-1])
    cfg = tiny_config(shards, tmp_path, "fp16-resumed", *overrides)
    with pytest.raises(Interrupted):
        run_local(cfg, interrupting_runtime(6))
    run_local(cfg)
    resumed = load_checkpoint(list_checkpoints(tmp_path / "fp16-resumed")[-1])

    assert straight["state"].step == resumed["state"].step == 8
    scaler = straight["scaler"]
    assert scaler is not None and scaler["scale"] < 65536.0, "no overflow was ever met: the test shows nothing"
    assert scaler["_growth_tracker"] > 0, "the scaler never let a step through"
    assert resumed["scaler"] == scaler
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    trained = [r for r in read_metrics(tmp_path / "fp16-straight") if r["kind"] == "step"]
    assert any(math.isfinite(r["grad_norm"]) for r in trained) and math.isfinite(trained[-1]["loss"])


# --- the EMA of the weights ---------------------------------------------------------------------------------------

EMA_OVERRIDES = (*RESUME_OVERRIDES, "train.ema_decay=0.9", "train.ema_warmup_steps=2")


def test_ema_resumes_exactly_and_differs_from_the_raw_weights(shards, tmp_path):
    """With the EMA on, k steps + a crash + the rest end on the same average as the straight run."""
    straight_cfg = tiny_config(shards, tmp_path, "ema-straight", *EMA_OVERRIDES)
    run_local(straight_cfg)
    straight = load_checkpoint(list_checkpoints(tmp_path / "ema-straight")[-1])
    cfg = tiny_config(shards, tmp_path, "ema-resumed", *EMA_OVERRIDES)
    with pytest.raises(Interrupted):
        run_local(cfg, interrupting_runtime(3))
    run_local(cfg)
    resumed = load_checkpoint(list_checkpoints(tmp_path / "ema-resumed")[-1])

    assert straight["ema"]["updates"] == resumed["ema"]["updates"] == 4
    for k, v in straight["ema"]["module"].items():
        torch.testing.assert_close(resumed["ema"]["module"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    moved = [
        k
        for k, v in straight["model"].items()
        if v.is_floating_point() and not torch.equal(v, straight["ema"]["module"][k])
    ]
    assert len(moved) > len(straight["model"]) // 2, "the average should lag the trained weights"


# --- run names ------------------------------------------------------------------------------------------------------


def test_default_run_names_differ_and_a_reused_name_with_another_model_is_refused(shards, tmp_path):
    from ddetr.config import ConfigError, build_config
    from ddetr.train import train

    names = {build_config("tiny").train.name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith("tiny-") for n in names)
    cfg = tiny_config(shards, tmp_path, "reused", "train.epochs=1", "train.max_steps_per_epoch=1")
    train(cfg, engine="local")
    other = apply_overrides(cfg, ["model.num_queries=12", "model.dec_n_points=2"])
    with pytest.raises(ConfigError, match="reused") as err:
        train(other, engine="local")
    assert "model.num_queries 30 -> 12" in str(err.value) and "model.dec_n_points 4 -> 2" in str(err.value)
    # The same model continues (here: nothing left to train), a new name starts afresh.
    assert train(cfg, engine="local")["step"] == 1
    assert train(apply_overrides(other, ["train.name=fresh"]), engine="local")["step"] == 1


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(shards, tmp_path, caplog):
    """A node lost while writing its checkpoint leaves a short state.pt: the resume names it and takes the
    previous checkpoint, which its manifest shows intact."""
    from ddetr.train.checkpoints import CorruptCheckpointError

    cfg = tiny_config(shards, tmp_path, "cut", "train.epochs=1", "train.max_steps_per_epoch=3",
                      "train.checkpoint_every_steps=1", "train.keep_checkpoints=5")  # fmt: skip
    run_local(cfg)
    checkpoints = list_checkpoints(tmp_path / "cut")
    newest, before = checkpoints[-1], checkpoints[-2]
    state = newest / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=f"{state}.*incomplete"):
        load_checkpoint(newest)
    runtime = LocalRuntime(cfg, device="cpu")
    with caplog.at_level("WARNING"):
        chosen = runtime.latest_checkpoint()
    runtime.close()
    assert chosen == before
    text = " ".join(r.getMessage() for r in caplog.records)
    assert str(state) in text and f"resuming from {before}" in text and newest.name in text
    assert load_checkpoint(chosen)["state"].step == 2
