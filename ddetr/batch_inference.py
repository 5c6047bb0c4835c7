"""Batch inference with Ray Data: an actor pool holding one model per actor, over shards or image files.

    ddetr predict --checkpoint results/demo/run --out preds/ --shards results/demo/synthetic/shards/val
    ddetr predict --checkpoint results/demo/run --out preds/ --batch results/demo/synthetic/images/val

Shards (a split folder, or a dataset folder's val split: `ddetr.config.data_split`) are read by Ray Data's Parquet
reader (image bytes and ids only). Image files (anything `ddetr.image_sources.list_images` lists: files, folders,
globs, `s3://` prefixes) are listed on the driver and read by the actors themselves: a file that does not read or
decode is then one warning naming it, where Ray's own file reader would fail the whole dataset. Either way images are
decoded and detected in `DetectBatch` actors (each loads the checkpoint once, on a GPU when the cluster has them), and
the detections stream back to the driver, which writes them as COCO results (`detections.json`: image_id,
category_id, category_name where the checkpoint or the shards name it, bbox xywh, score; for files also file_name)
under a temporary name first, and draws the first `draw` images. The pool grows from one actor to `max_actors` while
there is work: on an autoscaling cluster, `max_actors` comes from what the node types can grow to
(`ddetr.cluster.cluster_maxima`), not from the nodes up now, so a pool started on an empty cluster grows as the
autoscaler adds nodes. Local paths reach the actors made absolute: on a cluster of several nodes they must be on
storage every node mounts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ddetr import io
from ddetr.config import ConfigError, data_said, data_split
from ddetr.data.decode import decode_rgb
from ddetr.data.images import UNREADABLE
from ddetr.data.shards import read_metadata, read_shard, shard_uris
from ddetr.image_sources import ImageSource, list_images
from ddetr.inference import DETECTIONS_FILE, coco_records

log = logging.getLogger(__name__)


class DetectBatch:
    """Ray Data's callable class: one `Detector` per actor, a batch of rows in, their detections out.

    Rows hold "image_id" and either "image" (encoded bytes, from shards) or "path" (a file or URI the actor reads).
    Returns per image "image_id", "scores" (K,), "labels" (K,) and "boxes" (K * 4,) flat xyxy in the upright image's
    pixels, as object arrays (K differs between images only if the model's top-k does). Images are decoded reduced
    to the model's input size; one that does not read or decode is left out with a warning naming it (the driver
    counts it as skipped), never failing its batch.
    """

    def __init__(self, checkpoint: str, device: str | None = None) -> None:
        from ddetr.inference import Detector

        self.detector = Detector.from_checkpoint(checkpoint, device=device)
        self.readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ddetr-read")  # object storage latency

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:
            labels = [f"image_id {i}" for i in batch["image_id"]]
            encoded = list(batch["image"])
        else:
            labels = [str(p) for p in batch["path"]]
            encoded = list(self.readers.map(_read_or_error, labels))
        ids, images, sizes = [], [], []
        for image_id, label, data in zip(batch["image_id"], labels, encoded, strict=True):
            try:
                if isinstance(data, Exception):
                    raise data
                pixels, size = self.detector.decode(data)
            except UNREADABLE as err:
                log.warning("skipping %s: its bytes failed to decode (%s: %s)", label, type(err).__name__, err)
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


def _read_or_error(path: str) -> bytes | Exception:
    try:
        return io.read_bytes(path)
    except OSError as err:  # a missing or unreadable file: skipped like bytes that do not decode
        return err


def predict_shards(
    checkpoint: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    use_gpu: bool | None = None,
    draw: int = 8,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Detect objects in every image of a shard split; write `out/detections.json` and draw the first `draw`.

    Args:
        checkpoint: anything `Detector.from_checkpoint` reads; a run folder is resolved to its checkpoint here, once,
            so every actor loads the same one.
        data: a split folder, or a dataset folder (its val split; `ddetr.config.data_split`).
        max_actors: largest actor pool (default: the GPUs, or the CPUs / `cpus_per_actor`, the cluster can grow
            to, else that it has now).
        use_gpu: one GPU per actor (default: when the cluster has or can add GPUs).

    Returns:
        {"images", "detections", "seconds", "images_per_s", "max_actors", "file", "skipped"}: images left out
        because their bytes did not decode.
    """
    import ray.data

    checkpoint = _checkpoint(checkpoint)  # before Ray starts: a wrong path is one line
    split_dir = data_split(data)
    log.info("%s", data_said(str(data), "", split_dir))
    split_dir = io.absolute(split_dir)
    meta = read_metadata(split_dir)
    uris = shard_uris(split_dir, meta)
    names = _class_names(checkpoint) or {int(c["id"]): str(c["name"]) for c in meta.categories}
    ds = ray.data.read_parquet(uris).select_columns(["image_id", "image"])
    out = io.absolute(out)
    pool = {"batch_size": batch_size, "max_actors": max_actors, "cpus_per_actor": cpus_per_actor, "use_gpu": use_gpu}
    summary, first = _detect(ds, checkpoint, out, meta.num_images, split_dir, names, draw=draw, **pool)
    _draw_from_shards(uris, first, out, threshold, names)
    log.info("%s", summary)
    return summary


def predict_image_files(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    use_gpu: bool | None = None,
    draw: int = 8,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Detect objects in image files without shards: `inputs` as `ddetr.image_sources.list_images` reads them
    (files, folders, globs, `s3://` prefixes), listed here and read by the actors; write `out/detections.json`
    (records carry "file_name", image_id is the image's place in the listing) and draw the first `draw` images as
    `out/<name>.png`. Arguments and returns as `predict_shards`.

    Raises:
        ConfigError: the inputs name no image file.
    """
    import ray.data

    checkpoint = _checkpoint(checkpoint)
    images = list_images(inputs)
    if not images:
        raise ConfigError(f"ddetr predict --batch: no image file in {' '.join(map(str, inputs))}")
    names = _class_names(checkpoint)
    # Only paths travel: the actors read the bytes, in parallel, as the pool pulls rows.
    rows = [{"image_id": i, "path": io.absolute(image.path)} for i, image in enumerate(images)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 200)))
    out = io.absolute(out)
    pool = {"batch_size": batch_size, "max_actors": max_actors, "cpus_per_actor": cpus_per_actor, "use_gpu": use_gpu}
    summary, first = _detect(ds, checkpoint, out, len(images), "the files", names, draw=draw, files=images, **pool)
    _draw_files(images, first, out, threshold, names)
    log.info("%s", summary)
    return summary


def _checkpoint(checkpoint: str | os.PathLike) -> str:
    from ddetr.train.checkpoints import resolve_checkpoint

    return io.absolute(resolve_checkpoint(checkpoint))


def _class_names(checkpoint: str) -> dict[int, str] | None:
    """The checkpoint's category names. The driver reads the checkpoint for them once (its weights are freed at once);
    the actors hold the models."""
    from ddetr.models.weights import read_weights

    return read_weights(checkpoint).class_names


def _detect(
    ds: Any,
    checkpoint: str,
    out: str,
    total: int,
    where: str,
    names: dict[int, str] | None,
    *,
    batch_size: int,
    max_actors: int | None,
    cpus_per_actor: float,
    use_gpu: bool | None,
    draw: int,
    files: Sequence[ImageSource] | None = None,
) -> tuple[dict[str, Any], dict[int, dict[str, np.ndarray]]]:
    """Run `ds` (rows of "image_id" and "image" or "path") through the actor pool and stream its detections into
    `out/detections.json` (`out` absolute: the driver's). Returns the summary and the detections of the first
    `draw` images, by image id."""
    import ray.data

    from ddetr.ray_session import start_or_join

    start_or_join()
    max_actors, use_gpu = pool_size(max_actors, use_gpu, cpus_per_actor)
    io.makedirs(out)
    ds = ds.map_batches(
        DetectBatch,
        fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=0 if use_gpu else cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    log.info("detecting %d images of %s with up to %d %s actors", total, where, max_actors,
             "GPU" if use_gpu else "CPU")  # fmt: skip
    start = time.perf_counter()
    path = io.join(out, DETECTIONS_FILE)
    detections = 0
    done: set[int] = set()
    first: dict[int, dict[str, np.ndarray]] = {}
    with io.atomic_open(path) as f:
        f.write("[")
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for image_id, scores, labels, boxes in zip(
                batch["image_id"], batch["scores"], batch["labels"], batch["boxes"], strict=True
            ):
                image_id, boxes = int(image_id), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                extra = {"file_name": files[image_id].path} if files is not None else {}
                for record in coco_records(image_id, scores, labels, boxes, names=names):
                    f.write(("," if detections else "") + json.dumps({**record, **extra}))
                    detections += 1
                if len(first) < draw:
                    first[image_id] = {"scores": scores, "labels": labels, "boxes": boxes}
                done.add(image_id)
            if len(done) % max(batch_size * 25, 1) < batch_size:
                log.info("%d / %d images", len(done), total)
        f.write("]")
    seconds = time.perf_counter() - start
    if len(done) < total:
        named = ""
        if files is not None:
            missed = [image.path for i, image in enumerate(files) if i not in done]
            named = f": {', '.join(missed[:5])}" + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
        log.warning("%d of %d images were skipped: they did not read or decode (the actors' warnings say why)%s",
                    total - len(done), total, named)  # fmt: skip
    summary = {"images": len(done), "detections": detections, "seconds": round(seconds, 2),
               "images_per_s": round(len(done) / seconds, 2), "max_actors": max_actors, "file": path,
               "skipped": total - len(done)}  # fmt: skip
    return summary, first


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


def _draw_from_shards(
    uris: list[str], first: dict[int, dict[str, np.ndarray]], out: str, threshold: float, names: dict[int, str] | None
) -> None:
    """Draw the given images' detections into `out/<image_id>.png`, reading their bytes from the shards."""
    left = dict(first)
    for uri in uris:
        if not left:
            return
        table = read_shard(uri, ["image_id", "image"])
        for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True):
            det = left.pop(image_id, None)
            if det is not None:
                _draw(decode_rgb(data), det, io.join(out, f"{image_id}.png"), threshold, names)


def _draw_files(
    images: Sequence[ImageSource],
    first: dict[int, dict[str, np.ndarray]],
    out: str,
    threshold: float,
    names: dict[int, str] | None,
) -> None:
    """Draw the given images' detections into `out/<name>.png`, reading the files again."""
    from ddetr.inference import read_image

    for image_id, det in sorted(first.items()):
        image = images[image_id]
        try:
            pixels = read_image(image.path)
        except UNREADABLE as err:
            log.warning("%s: detected, but not drawn: %s", image.path, err)
            continue
        _draw(pixels, det, io.join(out, f"{image.name}.png"), threshold, names)


def _draw(pixels: np.ndarray, det: dict[str, np.ndarray], path: str, threshold: float, names: dict[int, str] | None):
    import torch

    from ddetr.inference import draw_detections

    tensors = {k: torch.tensor(np.asarray(v)) for k, v in det.items()}  # a copy: Ray hands out read-only arrays
    draw_detections(pixels, tensors, path, names=names, threshold=threshold)
