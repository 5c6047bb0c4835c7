"""Hybrid matching in the training engine: a run interrupted and resumed ends where the straight run ends (model,
one-to-many queries, optimizer, EMA, with gradient accumulation), and what the checkpoint ships is the plain model."""

from __future__ import annotations

import pytest
import torch
from test_train_engine import Interrupted, interrupting_runtime, run_local, tiny_config

from ddetr.data.synthetic import make_synthetic_coco
from ddetr.inference import Detector
from ddetr.models import build_detector, build_model, init_from, read_weights
from ddetr.train.checkpoints import list_checkpoints, load_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_synthetic_coco(str(tmp_path_factory.mktemp("syn")), 16, 0, seed=0, image_size=(64, 96)).train_shards


# Every switch that the single-stage model takes (its one-to-many queries are learned, so they are resumed too), with
# the EMA, two micro-batches per step, dropout and an lr drop between the epochs.
HYBRID = (
    "model.with_box_refine=true",
    "loss.one_to_many_queries=20",
    "loss.one_to_many_repeat=2",
    "loss.look_forward_twice=true",
    "train.epochs=2",
    "train.lr_drop=1",
    "train.max_steps_per_epoch=2",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=1",
    "train.total_batch_size=4",
    "train.ema_decay=0.9",
    "train.ema_warmup_steps=2",
    "model.dropout=0.1",
)


@pytest.mark.slow  # ~15 s: three short runs
def test_resumed_hybrid_run_equals_the_straight_run_and_ships_the_plain_model(shards, tmp_path):
    run_local(tiny_config(shards, tmp_path, "straight", *HYBRID))
    straight = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    cfg = tiny_config(shards, tmp_path, "resumed", *HYBRID)
    with pytest.raises(Interrupted):
        run_local(cfg, interrupting_runtime(3))
    run_local(cfg)
    resumed = load_checkpoint(list_checkpoints(tmp_path / "resumed")[-1])

    assert straight["state"].step == resumed["state"].step == 4 and resumed["ema"]["updates"] == 4
    extra = "one_to_many.query_embed.weight"
    assert extra in straight["model"] and extra in straight["ema"]["module"]  # the training state keeps them
    for entry in ("model", "ema"):
        ours = straight[entry] if entry == "model" else straight[entry]["module"]
        theirs = resumed[entry] if entry == "model" else resumed[entry]["module"]
        assert ours.keys() == theirs.keys()
        for k, v in ours.items():
            torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k, e=entry: f"{e} {k}: {m}")
    for i, s in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][i], s, rtol=1e-6, atol=1e-9)
    moved = straight["model"][extra] - build_model(cfg, load_backbone_weights=False)[0].state_dict()[extra]
    assert moved.abs().sum() > 0, "the one-to-many queries were trained"

    # What evaluation, export and serving read: the EMA, without the one-to-many queries, into the plain model.
    checkpoint = list_checkpoints(tmp_path / "resumed")[-1]
    shipped = read_weights(checkpoint).state
    assert set(shipped) == set(build_detector(cfg.model, load_backbone_weights=False).state_dict())
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    assert not hasattr(detector.model, "one_to_many") and not detector.model.training
    # Fine-tuning a hybrid model from it: everything loads but its own one-to-many queries, which start afresh.
    model = build_model(cfg, load_backbone_weights=False)[0]
    fresh = model.state_dict()[extra].clone()
    assert init_from(model, str(checkpoint), cfg.model, None) == []
    assert torch.equal(model.state_dict()[extra], fresh)
    torch.testing.assert_close(model.state_dict()["query_embed.weight"], shipped["query_embed.weight"])
