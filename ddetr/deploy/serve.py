"""Online detection on Ray Serve: a checkpoint behind `POST /detect`, with dynamic batching and autoscaled replicas.

    ddetr serve --checkpoint results/demo/run --port 8000      # a run folder serves its best checkpoint
    curl --data-binary @results/demo/synthetic/images/val/00000001.jpg -H "Content-Type: image/jpeg" \
        "http://127.0.0.1:8000/detect?threshold=0.5"

Requests (each handled by one `DetectorServer` replica):
  * `POST /detect` with `Content-Type: image/jpeg` or `image/png` and the image's bytes: one result;
  * `POST /detect` with `Content-Type: application/json` and a list of base64 images: a list of results;
  * `?threshold=S` (default `ServeSettings.threshold`): the lowest score returned;
  * `GET /healthz`: {"status": "ok", "device", "images", "batches": {batch size: count}, "inflight_pixels",
    "rss_bytes", "peak_rss_bytes"} of the replica answering.

A result is {"width", "height", "detections": [{"category_id", "category_name", "bbox": [x, y, w, h] in pixels,
"score"}, ...]}, best first, in the upright image's pixels (EXIF orientation applied); `category_name` is null where
the checkpoint has no name for the class. A bad request (empty body, not a JPEG/PNG, over the size or pixel limits,
another content type, bad JSON or threshold) is answered 4xx with {"error": message} before it reaches the model, so
it never fails the batch it would have joined; `admission.py` says in what order it is checked. Images from all
requests are detected together: `@serve.batch` gathers up to `max_batch_size` images, waiting at most `batch_wait_s`
for them. Replicas autoscale between `min_replicas` and `max_replicas` on their ongoing requests, each on
`cpus_per_replica` CPUs and one GPU when the cluster has (or can add) GPUs.

Hostile input: each request's images are checked from their headers before any is decoded (pixels per image and per
request), a replica holds at most `max_inflight_pixels` of requests at once (503 and Retry-After beyond), images are
decoded on the replica's decoding threads (never its event loop) reduced to the model's input size, and a request not
answered within `request_timeout_s` is cut (408 while its body is still arriving: a slow client). Serve checks each
replica with a tiny forward pass (`check_health`) and replaces one that fails.

On a running cluster (`RAY_ADDRESS`) the application keeps running after `ddetr serve` returns (`serve shutdown`
removes it); on a local Ray started here it serves until Ctrl-C or SIGTERM. KubeRay's RayService deploys the same
application from `app_builder` (cluster/kuberay/rayservice.yaml). `ddetr serve` gives up when its replicas are not
all running within `start_timeout_s` (replicas asking for more than the cluster has, or can add), naming what each
asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import resource
import signal
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ddetr.config import ConfigError
from ddetr.deploy.admission import (
    BadRequest,
    PixelBudget,
    Probe,
    decode_probes,
    detections_json,
    media_type,
    parse_threshold,
    probe_request,
    read_body,
)

log = logging.getLogger(__name__)

APP_NAME = "ddetr"
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """What `ddetr serve` deploys. Image limits apply to each image (of a JSON list too); the body of a JSON request
    may be as large as its images in base64, up to `max_request_bytes`. Pixels are width x height from the headers,
    whatever the reduction at decoding."""

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
    max_request_bytes: int = 64 * 1024 * 1024  # the body of a JSON list, whatever its images' own limits allow
    max_request_pixels: int = 100_000_000  # all the images of one request (413 beyond, before any is decoded)
    # Of the requests one replica holds at once (503 beyond): what they make it decode, and a bound on what they keep
    # (3 bytes a pixel at most, much less once reduced to the model's input size).
    max_inflight_pixels: int = 400_000_000
    request_timeout_s: float = 30.0  # a request not answered within it is cut (408 while its body is still arriving)
    start_timeout_s: float = 300.0  # `ddetr serve` gives up when the replicas are not all running within it
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
        limits = ("max_image_bytes", "max_image_pixels", "max_images_per_request", "max_request_bytes",
                  "max_request_pixels")  # fmt: skip
        if min(getattr(self, k) for k in limits) < 1:
            problems.append(f"{', '.join(limits)} must be positive")
        if self.max_inflight_pixels < self.max_request_pixels:
            problems.append(f"max_inflight_pixels ({self.max_inflight_pixels}) must be at least max_request_pixels "
                            f"({self.max_request_pixels}): a request that fits could never be served")  # fmt: skip
        if not (self.request_timeout_s > 0 and self.start_timeout_s > 0):
            problems.append(f"request_timeout_s and start_timeout_s must be positive, not {self.request_timeout_s}, "
                            f"{self.start_timeout_s}")  # fmt: skip
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
            images = (self.max_image_bytes * 4 // 3 + 8) * self.max_images_per_request + 16
            return min(images, self.max_request_bytes)
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
        self.budget = PixelBudget(settings.max_inflight_pixels)
        # Headers, base64 and decoding run here, off the event loop; as many threads as the replica has CPUs, so at
        # most that many images are ever being decoded at full resolution at once.
        threads = max(1, min(8, math.ceil(settings.cpus_per_replica)))
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="ddetr-decode")
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
            return JSONResponse(await self.detect(request))
        except BadRequest as err:
            headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
            return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)

    async def detect(self, request: Request) -> dict[str, Any] | list[dict[str, Any]]:
        """A /detect request's result(s), within `request_timeout_s` of its start; BadRequest otherwise."""
        s = self.settings
        threshold = parse_threshold(request.query_params.get("threshold"), s.threshold)
        kind = media_type(request.headers.get("content-type", ""))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.request_timeout_s
        try:  # the client's pace: a slow or stalled one is cut here
            body = await asyncio.wait_for(read_body(request, s.max_body_bytes(kind)), s.request_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the body did not arrive within {s.request_timeout_s:g} s") from None
        probes, many = await self.off_loop(probe_request, kind, body, s)  # 4xx here, nothing decoded yet
        del body  # the probes hold the images' bytes
        pixels = sum(p.pixels for p in probes)
        self.budget.take(pixels)
        try:
            decoded, detections = await asyncio.wait_for(self.decode_and_detect(probes), deadline - loop.time())
        except asyncio.TimeoutError:
            raise BadRequest(503, f"not answered within {s.request_timeout_s:g} s: the replica is busy; retry later",
                             retry_after_s=1) from None  # fmt: skip
        finally:
            self.budget.give(pixels)
        names = self.detector.class_names
        results = [detections_json(d, size, threshold, names) for d, (_, size) in zip(detections, decoded, strict=True)]
        return results if many else results[0]

    async def decode_and_detect(
        self, probes: list[Probe]
    ) -> tuple[list[tuple[np.ndarray, tuple[int, int]]], list[dict[str, Any]]]:
        """The probed images decoded (reduced, with their whole upright sizes) and their detections."""
        decoded = await self.off_loop(decode_probes, probes, self.detector.size, self.detector.max_size)
        # Each image joins the batch queue on its own, so a list is spread over batches like separate requests.
        return decoded, await asyncio.gather(*(self.detect_batch(item) for item in decoded))

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the decoding threads. A request cut meanwhile still waits for its thread to finish, so the
        pixel budget is given back only once its arrays are gone."""
        future = asyncio.get_running_loop().run_in_executor(self.decoders, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both replaced by the settings in __init__
    async def detect_batch(self, items: list[tuple[np.ndarray, tuple[int, int]]]) -> list[dict[str, Any]]:
        """Detections of (reduced pixels, (h, w) of the whole image) items, boxes in the whole image's pixels."""
        self.batch_sizes[len(items)] += 1
        images, sizes = [im for im, _ in items], [size for _, size in items]
        # In a thread: the event loop keeps reading requests (and filling the next batch) during the forward pass.
        return await asyncio.get_running_loop().run_in_executor(None, self.detector.predict, images, sizes)

    async def check_health(self) -> None:
        """Serve's periodic health check: a tiny forward pass on the replica's device, in a thread; an exception (a
        lost GPU, a broken model) marks the replica unhealthy and Serve replaces it."""
        tiny = [np.zeros((32, 32, 3), np.uint8)]
        await asyncio.get_running_loop().run_in_executor(None, self.detector.predict, tiny)

    def health(self) -> dict[str, Any]:
        s = self.settings
        return {"status": "ok", "device": str(self.detector.device), "checkpoint": s.checkpoint,
                "max_batch_size": s.max_batch_size, "batch_wait_s": s.batch_wait_s,
                "images": sum(n * c for n, c in self.batch_sizes.items()),
                "batches": {str(n): c for n, c in sorted(self.batch_sizes.items())},
                "inflight_pixels": self.budget.used, **process_memory()}  # fmt: skip


def process_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, in bytes (Linux: /proc; the peak from getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux
        rss = peak
    return {"rss_bytes": rss, "peak_rss_bytes": peak}


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
    import posixpath

    from ddetr import io
    from ddetr.train.checkpoints import is_checkpoint_name, resolve_checkpoint

    name = posixpath.basename(settings.checkpoint.rstrip("/"))
    if is_checkpoint_name(name) or name.endswith((".pth", ".pt")):
        # Names one checkpoint already: used as it is, without asking its storage (the replicas read it, and a
        # RayService manifest is validated where its bucket cannot be reached).
        return dataclasses.replace(settings, checkpoint=io.absolute(settings.checkpoint))
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


class ReplicasNotRunning(ConfigError):
    """The application's replicas were not all running within `start_timeout_s`: most often they ask for more than
    the cluster has or can add. The message names what each asked for and what the cluster has (one line in the CLI:
    the settings, or the cluster, must change)."""


def replica_resources(settings: ServeSettings) -> dict[str, float]:
    """What each replica asks Ray for: {"CPU": n, "GPU": 0 or 1}."""
    return {"CPU": settings.cpus_per_replica, "GPU": 1 if replicas_use_gpu(settings) else 0}


def wait_until_running(name: str, timeout_s: float, asked: dict[str, float], poll_s: float = 0.5) -> None:
    """Wait for the Serve application `name` to be RUNNING (all its starting replicas up).

    Raises:
        ReplicasNotRunning: not running after `timeout_s`; names `asked` (per replica), the cluster's resources and
            Serve's own word on the deployment.
        RuntimeError: the deployment failed (a replica's constructor raised), with Serve's message.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(app.status.value if app is not None else "NOT_STARTED")
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Serve application {name!r} failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    said = " ".join(d.message for d in app.deployments.values() if d.message) if app is not None else ""
    total, free = (
        {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
        for resources in (ray.cluster_resources(), ray.available_resources())
    )
    raise ReplicasNotRunning(
        f"the replicas of the Serve application {name!r} were not running after {timeout_s:g} s ({status}): each asks "
        f"for {asked}, the cluster has {total} ({free} free)"
        + (f"; Serve says: {' '.join(said.split())}" if said else "")
        + ". Give the cluster those resources, ask for less (--cpus-per-replica, --cpu), or wait longer for nodes "
        "being added (--start-timeout-s)"
    )


def deploy(settings: ServeSettings) -> bool:
    """Start Serve's HTTP proxy on `settings.host:port` and deploy the application; wait until it is running, at most
    `settings.start_timeout_s`.

    Connects to $RAY_ADDRESS when set, else starts a local Ray. Returns True when this call started that local Ray
    (the application ends with this process).

    Raises:
        ReplicasNotRunning: the replicas were not running in time (on a local Ray started here, Serve is shut down;
            on a cluster the application is left to start, `serve shutdown` removes it).
    """
    from ddetr.ray_session import start_or_join

    settings = resolved(settings)  # before Ray starts: a wrong path is one line; every replica loads the same one
    started = start_or_join()
    # The proxy cuts a request a little after the replica would, so that the replica's own answer (408, 503) comes
    # first; a client's x-request-timeout-seconds header can lift the proxy's limit, never the replica's.
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "request_timeout_s": settings.request_timeout_s + 5})  # fmt: skip
    # `_run` without blocking returns once the deployment exists: the wait for its replicas is ours, with an end.
    serve._run(build_app(settings), _blocking=False, name=settings.name, route_prefix="/")
    try:
        wait_until_running(settings.name, settings.start_timeout_s, replica_resources(settings))
    except ReplicasNotRunning as err:
        if started:
            serve.shutdown()
            raise
        raise ReplicasNotRunning(f"{err}. The application stays on the cluster and starts when it can; "
                                 f"`serve delete {settings.name}` removes it") from None  # fmt: skip
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
