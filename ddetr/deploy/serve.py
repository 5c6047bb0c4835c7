"""Online detection on Ray Serve: a checkpoint behind `POST /detect`, with dynamic batching and autoscaled replicas.

    ddetr serve --checkpoint results/demo/run --port 8000      # a run folder serves its best checkpoint
    curl --data-binary @results/demo/synthetic/images/val/00000001.jpg -H "Content-Type: image/jpeg" \
        "http://127.0.0.1:8000/detect?threshold=0.5"

Requests (each handled by one `DetectorServer` replica):
  * `POST /detect` with `Content-Type: image/jpeg` or `image/png` and the image's bytes: one result;
  * `POST /detect` with `Content-Type: application/json` and a list of base64 images: a list of results;
  * `?threshold=S` (default `ServeSettings.threshold`): the lowest score returned;
  * `GET /healthz`: {"status": "ok", "device", "images", "batches": {batch size: count}} of the replica answering.

A result is {"width", "height", "detections": [{"category_id", "category_name", "bbox": [x, y, w, h] in pixels,
"score"}, ...]}, best first; `category_name` is null where the checkpoint has no name for the class. A bad
request (empty body, not a JPEG/PNG, over the size limits, another content type, bad JSON or threshold) is
answered 4xx with {"error": message} before it reaches the model, so it never fails the batch it would have
joined. Images from all requests are detected together: `@serve.batch` gathers up to `max_batch_size` images,
waiting at most `batch_wait_s` for them. Replicas autoscale between `min_replicas` and `max_replicas` on their
ongoing requests, each on `cpus_per_replica` CPUs and one GPU when the cluster has (or can add) GPUs.

On a running cluster (`RAY_ADDRESS`) the application keeps running after `ddetr serve` returns (`serve shutdown`
removes it); on a local Ray started here it serves until Ctrl-C or SIGTERM. KubeRay's RayService deploys the same
application from `app_builder` (cluster/kuberay/rayservice.yaml).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import signal
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ddetr.config import ConfigError

log = logging.getLogger(__name__)

APP_NAME = "ddetr"
IMAGE_TYPES = ("image/jpeg", "image/png")
IMAGE_FORMATS = ("JPEG", "PNG")  # what PIL must find in the bytes, whatever the content type said


@dataclass(frozen=True)
class ServeSettings:
    """What `ddetr serve` deploys. Limits apply to each image (of a JSON list too); the body of a JSON request may
    be as large as its images in base64."""

    checkpoint: str
    host: str = "127.0.0.1"  # where the HTTP proxy listens; 0.0.0.0 for other machines
    port: int = 8000
    max_batch_size: int = 8  # images detected in one forward pass
    batch_wait_s: float = 0.01  # longest wait for a batch to fill once its first image is in
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 0.0  # per replica, what autoscaling aims at; 0: max_batch_size
    cpus_per_replica: float = 1.0  # decoding requests; a GPU replica takes one GPU as well
    use_gpu: bool | None = None  # None: a GPU per replica when the cluster has, or can add, GPUs
    threshold: float = 0.5  # default lowest score returned
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 25_000_000  # width x height, checked before decoding (a small file can be huge)
    max_images_per_request: int = 32  # of a JSON list
    name: str = APP_NAME  # the Serve application

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoint:
            problems.append("a checkpoint is needed")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be at least 1, not {self.max_batch_size}")
        if self.batch_wait_s < 0:
            problems.append(f"batch_wait_s must be 0 or more, not {self.batch_wait_s}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            problems.append(f"need 0 <= min_replicas <= max_replicas, 1 <= max_replicas; got {self.min_replicas}, "
                            f"{self.max_replicas}")  # fmt: skip
        if not 0 <= self.threshold <= 1:
            problems.append(f"threshold must be within [0, 1], not {self.threshold}")
        if min(self.max_image_bytes, self.max_image_pixels, self.max_images_per_request) < 1:
            problems.append("max_image_bytes, max_image_pixels and max_images_per_request must be positive")
        if not 0 < self.port < 65536:
            problems.append(f"port must be within 1-65535, not {self.port}")
        if problems:
            raise ConfigError("serve settings: " + "; ".join(problems))

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        """Settings from a Serve config's `args` (typed YAML) or `serve run ... key=value` (strings)."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - fields)
        if unknown:
            raise ConfigError(f"unknown serve settings {unknown}; known: {sorted(fields)}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in args.items()})

    def max_body_bytes(self, content_type: str) -> int:
        """The largest body of a request: one image, or a JSON list of them in base64 (4 characters per 3 bytes)."""
        if content_type == "application/json":
            return (self.max_image_bytes * 4 // 3 + 8) * self.max_images_per_request + 16
        return self.max_image_bytes

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def _coerce(name: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if value.lower() in ("none", "null", "") and type(None) in typing.get_args(hint):
        return None
    try:
        if bool in kinds:
            return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        return kinds[0](value)
    except (KeyError, ValueError):
        raise ConfigError(f"serve setting {name}={value!r} is not a {kinds[0].__name__}") from None


# ---- requests ---------------------------------------------------------------------------------------------------


class BadRequest(Exception):
    """A request the service refuses: `status` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_bytes: int, max_pixels: int, where: str = "the body") -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a JPEG or PNG; BadRequest (400, 413, 415) naming `where` otherwise."""
    if not data:
        raise BadRequest(400, f"{where} is empty: send the bytes of a JPEG or PNG image")
    if len(data) > max_bytes:
        raise BadRequest(413, f"{where} has {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with Image.open(BytesIO(data)) as picture:  # reads the header only
            if picture.format not in IMAGE_FORMATS:
                raise BadRequest(415, f"{where} is a {picture.format} image; send JPEG or PNG")
            width, height = picture.size
            if width * height > max_pixels:
                raise BadRequest(413, f"{where} is {width}x{height} pixels, over the limit of {max_pixels}")
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # truncated or not an image
        if isinstance(err, Image.DecompressionBombError):
            raise BadRequest(413, f"{where}: {err}") from None
        raise BadRequest(400, f"{where} is not a readable JPEG or PNG image ({err})") from None


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header ("image/png; q=1" -> "image/png"), refused (415) unless served."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in (*IMAGE_TYPES, "application/json"):
        raise BadRequest(415, f"content type {kind or '(none)'!r}: send image/jpeg, image/png, or application/json "
                              "with a list of base64 images")  # fmt: skip
    return kind


def decode_request(kind: str, body: bytes, settings: ServeSettings) -> tuple[list[np.ndarray], bool]:
    """(images, whether the request sent a JSON list) of a /detect body of media type `kind`."""
    max_bytes, max_pixels = settings.max_image_bytes, settings.max_image_pixels
    if kind in IMAGE_TYPES:
        return [decode_image(body, max_bytes, max_pixels)], False
    if not body:
        raise BadRequest(400, "the body is empty: send a JSON list of base64 images")
    try:
        items = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"the body is not JSON ({err})") from None
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise BadRequest(400, "the JSON body must be a non-empty list of base64 strings, one per image")
    if len(items) > settings.max_images_per_request:
        raise BadRequest(
            413, f"{len(items)} images in one request, over the limit of {settings.max_images_per_request}"
        )
    images = []
    for i, item in enumerate(items):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"image {i} of the list is not valid base64") from None
        images.append(decode_image(data, max_bytes, max_pixels, where=f"image {i} of the list"))
    return images, True


def parse_threshold(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise BadRequest(400, f"threshold={value!r}: give a score within [0, 1]")
    return threshold


def detections_json(det: dict[str, Any], image: np.ndarray, threshold: float, names: dict[int, str] | None) -> dict:
    """One image's result: its size and its detections scoring at least `threshold`, best first, boxes xywh."""
    scores, labels, boxes = det["scores"].numpy(), det["labels"].numpy(), det["boxes"].numpy()
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= threshold]
    found = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        label = int(labels[i])
        found.append({"category_id": label, "category_name": (names or {}).get(label),
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])})  # fmt: skip
    return {"width": int(image.shape[1]), "height": int(image.shape[0]), "detections": found}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body has {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the deployment ---------------------------------------------------------------------------------------------


@serve.deployment
class DetectorServer:
    """One replica: a `Detector` loaded once, HTTP in, batched detection, JSON out."""

    def __init__(self, settings: ServeSettings, device: str) -> None:
        from ddetr.inference import Detector

        self.settings = settings
        self.detector = Detector.from_checkpoint(settings.checkpoint, device=device)
        self.detect_batch.set_max_batch_size(settings.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        # One detection before the replica is ready: the first call loads the compiled op (tens of seconds on a busy
        # CPU), which would otherwise land on the first request.
        self.detector.predict([np.zeros((64, 64, 3), np.uint8)])
        self.batch_sizes: Counter[int] = Counter()  # batch size -> batches formed (GET /healthz)
        log.info("serving %s on %s", settings.checkpoint, self.detector.device)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if path == "healthz":
                return JSONResponse(self.health())
            if path != "detect":
                raise BadRequest(404, f"no {request.url.path}: POST /detect or GET /healthz")
            if request.method != "POST":
                raise BadRequest(405, f"{request.method} /detect: use POST with an image or a JSON list of images")
            threshold = parse_threshold(request.query_params.get("threshold"), self.settings.threshold)
            kind = media_type(request.headers.get("content-type", ""))
            body = await read_body(request, self.settings.max_body_bytes(kind))
            images, many = decode_request(kind, body, self.settings)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        # Each image joins the batch queue on its own, so a list is spread over batches like separate requests.
        detections = await asyncio.gather(*(self.detect_batch(im) for im in images))
        names = self.detector.class_names
        results = [detections_json(d, im, threshold, names) for d, im in zip(detections, images, strict=True)]
        return JSONResponse(results if many else results[0])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both replaced by the settings in __init__
    async def detect_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        self.batch_sizes[len(images)] += 1
        # In a thread: the event loop keeps reading requests (and filling the next batch) during the forward pass.
        return await asyncio.get_running_loop().run_in_executor(None, self.detector.predict, images)

    def health(self) -> dict[str, Any]:
        s = self.settings
        return {"status": "ok", "device": str(self.detector.device), "checkpoint": s.checkpoint,
                "max_batch_size": s.max_batch_size, "batch_wait_s": s.batch_wait_s,
                "images": sum(n * c for n, c in self.batch_sizes.items()),
                "batches": {str(n): c for n, c in sorted(self.batch_sizes.items())}}  # fmt: skip


def replicas_use_gpu(settings: ServeSettings) -> bool:
    """`settings.use_gpu`, or whether the cluster has GPUs or its node types can add some."""
    import ray

    from ddetr.cluster import cluster_maxima

    if settings.use_gpu is not None:
        return settings.use_gpu
    return (cluster_maxima() or ray.cluster_resources()).get("GPU", 0) > 0


def resolved(settings: ServeSettings) -> ServeSettings:
    """`settings` with its checkpoint resolved once, for every replica to load the same one: a run folder (or
    `RUN_DIR/latest`) becomes its checkpoint's absolute path (`ddetr.train.checkpoints.resolve_checkpoint`).

    Raises:
        FileNotFoundError: no checkpoint there, naming the path.
    """
    from ddetr import io
    from ddetr.train.checkpoints import resolve_checkpoint

    return dataclasses.replace(settings, checkpoint=io.absolute(resolve_checkpoint(settings.checkpoint)))


def build_app(settings: ServeSettings) -> serve.Application:
    """The Serve application of `settings` (on the Ray this process is connected to); its checkpoint as given
    (`resolved` turns a run folder into one)."""
    use_gpu = replicas_use_gpu(settings)
    target = settings.target_ongoing_requests or settings.max_batch_size
    deployment = DetectorServer.options(
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "initial_replicas": max(1, settings.min_replicas),
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": target,
        },
        # Room for a full batch in flight and the next one filling; requests past it wait in the proxy.
        max_ongoing_requests=max(2 * settings.max_batch_size, int(2 * target)),
    )
    return deployment.bind(settings, "cuda" if use_gpu else "cpu")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `import_path: ddetr.deploy.serve:app_builder` with `args` (ServeSettings'
    fields; host and port are the cluster's HTTP options there)."""
    return build_app(resolved(ServeSettings.from_args(args)))


def deploy(settings: ServeSettings) -> bool:
    """Start Serve's HTTP proxy on `settings.host:port` and deploy the application; wait until it is running.

    Connects to $RAY_ADDRESS when set, else starts a local Ray. Returns True when this call started that local Ray
    (the application ends with this process).
    """
    from ddetr.train.ray_train import init_local_ray

    settings = resolved(settings)  # before Ray starts: a wrong path is one line; every replica loads the same one
    started = init_local_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=settings.name, route_prefix="/")
    log.info("%s serving %s at %s/detect", settings.name, settings.checkpoint, settings.url)
    return started


def run(settings: ServeSettings) -> None:
    """`ddetr serve`: deploy; on a local Ray, serve until Ctrl-C and then shut it down."""
    settings = resolved(settings)
    local = deploy(settings)
    print(f"serving {settings.checkpoint} at {settings.url}/detect (health: {settings.url}/healthz)", flush=True)
    if not local:
        print(f"the application {settings.name!r} keeps running on the cluster; `serve shutdown` removes it")
        return
    # SIGTERM (a service manager, `kill`) ends it as Ctrl-C does: Serve and the local Ray shut down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
