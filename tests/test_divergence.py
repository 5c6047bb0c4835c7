"""Divergence: a step with non-finite gradients is skipped and changes nothing, a run of them stops the run, non-finite
model outputs stop it at once (never a matcher's ValueError), and no checkpoint ever holds a NaN. The tiny preset
on a few synthetic images, one process; one Ray run."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from ddetr.config import Config, ConfigError, apply_overrides, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.models import build_model
from ddetr.train import loop, train
from ddetr.train.callbacks import ImageTrace, StepInfo
from ddetr.train.checkpoints import list_checkpoints, load_checkpoint
from ddetr.train.engine import NonFiniteLossError, nan_losses, train_step
from ddetr.train.logbook import read_metrics
from ddetr.train.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: a second one competing with other processes on a small machine makes tiny steps slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 16, 0, seed=0, image_size=(64, 96))


def tiny_config(dataset, storage: Path, name: str, *overrides: str) -> Config:
    """The tiny preset at a tenth of the paper's image sizes, one epoch, a checkpoint after every step, all kept."""
    return apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={dataset.train_shards}",
            "data.scale=0.1",
            "data.loader_workers=0",
            f"train.storage_path={storage}",
            f"train.name={name}",
            "train.log_every=1000",
            "train.epochs=1",
            "train.checkpoint_every_steps=1",
            "train.keep_checkpoints=10",
            *overrides,
        ],
    )


def synthetic_batch(seed: int) -> dict:
    """Two 32x48 images (no padding) with 1 and 2 boxes."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in (1, 2):
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"boxes": torch.cat([centre, size], 1), "labels": torch.randint(1, 5, (n,), generator=g)})
    images = torch.randn(2, 3, 32, 48, generator=g)
    return {"images": images, "mask": torch.zeros(2, 32, 48, dtype=torch.bool), "targets": targets}


def nonfinite_tensors(obj, path: str = "") -> tuple[list[str], int]:
    """(paths of the floating-point tensors in `obj` holding a NaN or an inf, number of such tensors looked at)."""
    if torch.is_tensor(obj):
        if not obj.is_floating_point():
            return [], 0
        return ([] if torch.isfinite(obj).all() else [path]), 1
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    bad, seen = [], 0
    for k, v in items:
        b, s = nonfinite_tensors(v, f"{path}/{k}")
        bad, seen = bad + b, seen + s
    return bad, seen


def assert_all_finite(checkpoint: dict) -> None:
    """Every tensor of the model, its EMA (when on) and the optimizer state is finite, and there are many of them."""
    for part in ("model", "ema", "optimizer"):
        if part == "ema" and checkpoint["ema"] is None:
            continue
        bad, seen = nonfinite_tensors(checkpoint[part], part)
        assert seen > 50, f"{part}: only {seen} tensors looked at"
        assert bad == [], f"non-finite tensors in the checkpoint: {bad}"


def assert_same_tensors(a, b, what: str) -> None:
    """`a` and `b` (nested dicts of tensors) are bitwise equal."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}/{k}")
    else:
        assert a == b, what


def poison_gradients(monkeypatch, steps: set[int]) -> list[int]:
    """Fill one parameter's gradient with NaN in the backward of the optimizer steps in `steps` (1-based; one
    micro-batch a step), leaving the loss finite. Returns the list that grows by one at each backward."""
    build, backwards = loop.build_model, []

    def poisoned_build_model(cfg: Config, **kwargs):
        model, criterion, postprocessors = build(cfg, **kwargs)

        def nan_on_chosen_steps(p: torch.Tensor) -> None:
            backwards.append(1)
            if len(backwards) in steps:
                p.grad.fill_(math.nan)

        model.transformer.level_embed.register_post_accumulate_grad_hook(nan_on_chosen_steps)
        return model, criterion, postprocessors

    monkeypatch.setattr(loop, "build_model", poisoned_build_model)
    return backwards


# --- one step, driven directly ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.1, 0.0], ids=["clipped", "unclipped"])
def test_a_nan_gradient_with_a_finite_loss_skips_the_step_and_changes_nothing(max_norm):
    cfg = get_preset("tiny")
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    first = train_step(model, criterion, [synthetic_batch(0)], optimizer, device=CPU, max_norm=max_norm)
    assert first["skipped_step"] == 0.0 and math.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    hook = model.transformer.level_embed.register_hook(lambda grad: torch.full_like(grad, math.nan))
    skipped = train_step(model, criterion, [synthetic_batch(1)], optimizer, device=CPU, max_norm=max_norm)
    hook.remove()
    assert skipped["skipped_step"] == 1.0 and math.isnan(skipped["grad_norm"])
    assert math.isfinite(skipped["loss"]) and skipped.keys() == first.keys()
    assert_same_tensors(model.state_dict(), weights, "model")
    assert_same_tensors(optimizer.state_dict(), state, "optimizer")
    assert all(p.grad is None for p in model.parameters()), "the poisoned gradients were left for the next step"

    # The next step is taken as usual, from the same weights.
    taken = train_step(model, criterion, [synthetic_batch(1)], optimizer, device=CPU, max_norm=max_norm)
    assert taken["skipped_step"] == 0.0 and math.isfinite(taken["grad_norm"])
    assert not torch.equal(model.transformer.level_embed, weights["transformer.level_embed"])
    assert int(optimizer.state_dict()["state"][0]["step"]) == 2


def test_nan_model_outputs_raise_a_nonfinite_loss_error_naming_the_output():
    """NaN boxes make the Hungarian matcher raise a ValueError (scipy), which Ray would retry as a dead worker; the
    step raises NonFiniteLossError naming the output instead, and changes nothing."""
    cfg = get_preset("tiny")
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    model.register_forward_hook(lambda module, args, out: {**out, "pred_boxes": out["pred_boxes"] * math.nan})
    batch = synthetic_batch(0)
    with pytest.raises(ValueError):  # what the criterion does with such outputs: the failure this guards against
        criterion(model(batch["images"], batch["mask"]), batch["targets"])
    weights = copy.deepcopy(model.state_dict())

    with pytest.raises(NonFiniteLossError, match=r"model outputs were not finite \(pred_boxes\)") as err:
        train_step(model, criterion, [batch], optimizer, device=CPU)
    # Only the final layer's boxes were poisoned, and every weighted loss term is listed (as nan).
    assert "aux_outputs" not in str(err.value)
    for term in criterion.weight_dict:
        assert f"{term}=nan" in str(err.value)
    assert_same_tensors(model.state_dict(), weights, "model")
    assert optimizer.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())


def test_the_nan_loss_reaches_every_parameter_the_criterion_reaches():
    """Under DDP a rank whose outputs are not finite must all-reduce the same gradients as the others: the loss that
    replaces the criterion's gives a gradient to exactly the parameters the criterion's loss does."""
    batch = synthetic_batch(0)
    for variant in ([], ["model.with_box_refine=true", "model.two_stage=true"]):  # + aux and encoder outputs
        model, criterion, _ = build_model(apply_overrides(get_preset("tiny"), variant))
        reached = {}
        for name, make_losses in {
            "criterion": lambda out, criterion=criterion: criterion(out, batch["targets"]),
            "nan": lambda out, criterion=criterion: nan_losses(out, criterion.weight_dict),
        }.items():
            model.zero_grad(set_to_none=True)
            outputs = model(batch["images"], batch["mask"])
            criterion.total_loss(make_losses(outputs)).backward()
            reached[name] = {n for n, p in model.named_parameters() if p.grad is not None}
        assert len(reached["criterion"]) > 50 and reached["nan"] == reached["criterion"], variant


def test_max_nonfinite_steps_must_allow_at_least_one_step():
    assert get_preset("tiny").train.max_nonfinite_steps == 3
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps must be at least 1, got 0"):
        apply_overrides(get_preset("tiny"), ["train.max_nonfinite_steps=0"])


# --- whole runs ---------------------------------------------------------------------------------------------------


def test_one_nan_gradient_step_is_skipped_and_the_run_saves_only_finite_tensors(dataset, tmp_path, monkeypatch):
    """Step 2 of 4 gets a NaN gradient: it is skipped (weights, optimizer and EMA as after step 1), counted, and
    the run goes on to the end. Every checkpoint it wrote is finite."""
    backwards = poison_gradients(monkeypatch, {2})
    cfg = tiny_config(dataset, tmp_path, "one-nan", "train.max_steps_per_epoch=4", "train.ema_decay=0.9",
                      "train.ema_warmup_steps=2")  # fmt: skip
    metrics = train(cfg, engine="local")
    assert len(backwards) == 4 and metrics["step"] == 4
    assert metrics["train/skipped_steps"] == 1.0 and math.isfinite(metrics["train/grad_norm"])

    checkpoints = {int(p.name.split("_")[1]): load_checkpoint(p) for p in list_checkpoints(tmp_path / "one-nan")}
    assert sorted(checkpoints) == [1, 2, 3, 4]
    for checkpoint in checkpoints.values():
        assert_all_finite(checkpoint)
    one, two, four = checkpoints[1], checkpoints[2], checkpoints[4]
    assert_same_tensors(two["model"], one["model"], "model")
    assert_same_tensors(two["optimizer"]["state"], one["optimizer"]["state"], "optimizer")
    assert_same_tensors(two["ema"], one["ema"], "ema")  # not moved by the skipped step
    assert two["state"].step == 2 and four["ema"]["updates"] == 3
    assert int(four["optimizer"]["state"][0]["step"]) == 3

    records = read_metrics(tmp_path / "one-nan")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["skipped_step"] for r in steps] == [0, 1, 0, 0] and "grad_norm" not in steps[1]
    assert [(r["step"], r["grad_norm"]) for r in records if r["kind"] == "skipped_step"] == [(2, "nan")]


def test_nan_gradients_on_max_nonfinite_steps_in_a_row_stop_the_run(dataset, tmp_path, monkeypatch):
    """NaN gradients at steps 2, 4 and 5 with train.max_nonfinite_steps=2: step 3 ends the first streak, the
    second reaches the limit at step 5 and stops the run. The last checkpoint on disk is finite."""
    backwards = poison_gradients(monkeypatch, {2, 4, 5})
    cfg = tiny_config(dataset, tmp_path, "streak", "train.max_steps_per_epoch=7", "train.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, engine="local")
    message = str(err.value)
    assert "epoch 0, optimizer step 5 (step 5 of the epoch)" in message
    assert "not finite for 2 consecutive steps" in message and "loss_bbox=" in message
    assert len(backwards) == 5

    on_disk = list_checkpoints(tmp_path / "streak")
    assert [p.name for p in on_disk] == [f"checkpoint_{s:08d}" for s in (1, 2, 3, 4)]
    last = load_checkpoint(on_disk[-1])
    assert_all_finite(last)
    assert last["state"].step == 4
    assert_same_tensors(last["model"], load_checkpoint(on_disk[-2])["model"], "model")  # step 4 was skipped


# --- Ray ------------------------------------------------------------------------------------------------------------


class NanOutputsAfterStep:
    """A step callback that makes every DeformableDETR in rank `rank`'s process return NaN boxes after step `step`:
    the model is built inside the Ray worker, so the fault travels there with the callbacks."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.driver_pid = rank, step, os.getpid()

    def after_step(self, info: StepInfo) -> None:
        if (info.rank, info.step) != (self.rank, self.step) or os.getpid() == self.driver_pid:  # never the test's own
            return
        from ddetr.models.deformable_detr import DeformableDETR

        forward = DeformableDETR.forward

        def nan_boxes(model, images, mask=None):
            out = forward(model, images, mask)
            return {**out, "pred_boxes": out["pred_boxes"] * math.nan}

        DeformableDETR.forward = nan_boxes


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "message"),
    [(1, r"model outputs were not finite \(pred_boxes\)"), (2, "model outputs were not finite on another worker")],
    ids=["one-worker", "two-workers"],
)
def test_nan_outputs_end_a_ray_run_without_retrying(ray_local, dataset, tmp_path, hard_timeout, workers, message):
    """The last worker's model outputs NaN boxes from step 2: the run ends with NonFiniteLossError saying so, not a
    ValueError that `train.max_failures` retries (a retried worker, in a fresh process, would train on). With two
    workers under DDP, the healthy rank 0 takes the same gradient all-reduce and stops at the same step (no hang),
    and its message, the run's, says another worker's outputs were not finite."""
    from ddetr.train.ray_train import build_trainer, check_result

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback travels by value
    cfg = apply_overrides(
        tiny_config(dataset, tmp_path, "ray-nan", "train.max_steps_per_epoch=4"),
        [f"train.num_workers={workers}", "train.cpus_per_worker=0.5", "train.max_failures=3",
         "train.controller_failure_limit=0"],
    )  # fmt: skip
    trace = tmp_path / "trace.jsonl"
    trainer = build_trainer(cfg, step_callbacks=[ImageTrace(trace), NanOutputsAfterStep(workers - 1, 1)])
    with hard_timeout(240), pytest.raises(NonFiniteLossError, match=f"optimizer step 2 .*{message}"):
        check_result(trainer.fit())
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sorted((line["rank"], line["step"]) for line in lines) == [(r, 1) for r in range(workers)], "retried"
    assert_all_finite(load_checkpoint(list_checkpoints(tmp_path / "ray-nan")[-1]))
