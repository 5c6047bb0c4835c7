"""Batch inference over a shard folder with Ray Data: an actor pool holding one model per actor.

    ddetr predict --checkpoint results/demo/run --shards results/demo/synthetic/shards/val --out preds/

Shards are read by Ray Data's Parquet reader (image bytes and ids only), decoded and detected in `DetectBatch`
actors (each loads the checkpoint once, on a GPU when the cluster has them), and the detections stream back to
the driver, which writes them as COCO results (`detections.json`: image_id, category_id, bbox xywh, score)
under a temporary name first. The pool grows from one actor to `max_actors` while there is work: on an autoscaling
cluster, `max_actors` comes from what the node types can grow to (`ddetr.cluster.cluster_maxima`), not from the
nodes up now, so a pool started on an empty cluster grows as the autoscaler adds nodes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from ddetr import io
from ddetr.data.decode import decode_rgb
from ddetr.data.images import UNREADABLE
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.inference import coco_records

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections.json"


class DetectBatch:
    """Ray Data's callable class: one `Detector` per actor, a batch of shard rows in, their detections out.

    Returns per image "image_id", "scores" (K,), "labels" (K,) and "boxes" (K * 4,) flat xyxy in the upright image's
    pixels, as object arrays (K differs between images only if the model's top-k does). Images are decoded reduced
    to the model's input size; one whose bytes do not decode is left out with a warning naming its image id (the
    driver counts it as skipped), never failing its batch.
    """

    def __init__(self, checkpoint: str, device: str | None = None) -> None:
        from ddetr.inference import Detector

        self.detector = Detector.from_checkpoint(checkpoint, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, images, sizes = [], [], []
        for image_id, data in zip(batch["image_id"], batch["image"], strict=True):
            try:
                pixels, size = self.detector.decode(data)
            except UNREADABLE as err:
                log.warning("skipping image_id %s: its bytes failed to decode (%s: %s)", image_id,
                            type(err).__name__, err)  # fmt: skip
                continue
            ids.append(int(image_id))
            images.append(pixels)
            sizes.append(size)
        detections = self.detector.predict(images, sizes) if images else []
        out: dict[str, Any] = {"image_id": np.asarray(ids, dtype=np.int64)}
        for key in ("scores", "labels", "boxes"):
            column = np.empty(len(detections), dtype=object)
            column[:] = [d[key].reshape(-1).numpy() for d in detections]
            out[key] = column
        return out


def predict_shards(
    checkpoint: str | os.PathLike,
    split_dir: str,
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    use_gpu: bool | None = None,
    draw: int = 8,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Detect objects in every image of a shard folder; write `out/detections.json` and draw the first `draw`.

    Args:
        checkpoint: anything `Detector.from_checkpoint` reads; a run folder is resolved to its checkpoint here, once,
            so every actor loads the same one.
        max_actors: largest actor pool (default: the GPUs, or the CPUs / `cpus_per_actor`, the cluster can grow
            to, else that it has now).
        use_gpu: one GPU per actor (default: when the cluster has or can add GPUs).

    Returns:
        {"images", "detections", "seconds", "images_per_s", "max_actors", "file", "skipped"}: images left out
        because their bytes did not decode.
    """
    import ray
    import ray.data

    from ddetr.train.checkpoints import resolve_checkpoint
    from ddetr.train.ray_train import init_local_ray

    checkpoint = io.absolute(resolve_checkpoint(checkpoint))  # before Ray starts: a wrong path is one line
    init_local_ray()
    meta = read_metadata(split_dir)
    uris = shard_uris(split_dir, meta)
    max_actors, use_gpu = pool_size(max_actors, use_gpu, cpus_per_actor)
    out = io.absolute(out)
    io.makedirs(out)
    ds = (
        ray.data.read_parquet(uris)
        .select_columns(["image_id", "image"])
        .map_batches(
            DetectBatch,
            fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if use_gpu else "cpu"},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
            num_cpus=0 if use_gpu else cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        )
    )
    log.info("detecting %d images of %s with up to %d %s actors", meta.num_images, split_dir, max_actors,
             "GPU" if use_gpu else "CPU")  # fmt: skip
    start = time.perf_counter()
    path = io.join(out, DETECTIONS_FILE)
    images = detections = 0
    first: dict[int, dict[str, np.ndarray]] = {}
    with io.atomic_open(path) as f:
        f.write("[")
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for image_id, scores, labels, boxes in zip(
                batch["image_id"], batch["scores"], batch["labels"], batch["boxes"], strict=True
            ):
                boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                for record in coco_records(int(image_id), scores, labels, boxes):
                    f.write(("," if detections else "") + json.dumps(record))
                    detections += 1
                if len(first) < draw:
                    first[int(image_id)] = {"scores": scores, "labels": labels, "boxes": boxes}
                images += 1
            if images % max(batch_size * 25, 1) < batch_size:
                log.info("%d / %d images", images, meta.num_images)
        f.write("]")
    seconds = time.perf_counter() - start
    if images < meta.num_images:
        log.warning("%d of %d images were skipped: their bytes failed to decode (the actors' warnings name them)",
                    meta.num_images - images, meta.num_images)  # fmt: skip
    _draw_first(uris, first, out, threshold, {c["id"]: c["name"] for c in meta.categories})
    summary = {"images": images, "detections": detections, "seconds": round(seconds, 2),
               "images_per_s": round(images / seconds, 2), "max_actors": max_actors, "file": path,
               "skipped": meta.num_images - images}  # fmt: skip
    log.info("%s", summary)
    return summary


def pool_size(max_actors: int | None, use_gpu: bool | None, cpus_per_actor: float) -> tuple[int, bool]:
    """(largest actor pool, GPU actors) for `predict_shards`: the arguments when given, else from what the cluster
    can grow to (its node types' maxima), else from what is up now; at least one actor."""
    import ray

    from ddetr.cluster import cluster_maxima

    resources = cluster_maxima() or ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if max_actors is None:
        max_actors = gpus if use_gpu else int(resources.get("CPU", 1) // cpus_per_actor)
    return max(1, max_actors), use_gpu


def _draw_first(
    uris: list[str], first: dict[int, dict[str, np.ndarray]], out: str, threshold: float, names: dict[int, str]
) -> None:
    """Draw the given images' detections into `out/<image_id>.png`, reading their bytes from the shards."""
    import torch

    from ddetr.inference import draw_detections

    left = dict(first)
    for uri in uris:
        if not left:
            return
        table = read_shard(uri, ["image_id", "image"])
        for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True):
            det = left.pop(image_id, None)
            if det is not None:
                tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in det.items()}
                picture = io.join(out, f"{image_id}.png")
                draw_detections(decode_rgb(data), tensors, picture, names=names, threshold=threshold)
