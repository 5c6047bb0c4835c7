"""The Ray Serve application: a real Serve deployment on loopback and real HTTP requests.

Detections over HTTP equal `Detector.predict` on the same pixels; every bad request gets its 4xx and the replica
answers the next good one; concurrent requests are detected in batches of more than one image (the replica's
batch counter, from GET /healthz); hostile input (a list of huge images, a 1x3000 image, a client that stalls its
body) is refused or answered and the replica keeps serving; replicas that cannot be scheduled are given up on;
`ddetr serve` on a running cluster (RAY_ADDRESS) redeploys the application.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.config import ConfigError, apply_overrides, get_preset
from ddetr.inference import Detector
from ddetr.train.checkpoints import save_checkpoint
from ddetr.train.loop import Training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]
MAX_IMAGE_BYTES = 100_000
MAX_IMAGE_PIXELS = 25_000_000  # the default: a 4900x4900 image passes on its own
MAX_REQUEST_PIXELS = 30_000_000  # one such image per request
REQUEST_TIMEOUT_S = 4.0
MAX_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def post(url: str, body: bytes, content_type: str | None, timeout: float = 60) -> tuple[int, object]:
    """(status, decoded JSON) of a POST; 4xx/5xx answers too."""
    request = urllib.request.Request(url, data=body, method="POST")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Six 72x96 images of coloured blocks on noise: one size, so batches need no padding and an image's
    detections do not depend on the batch it joined."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(6):
        im = rng.integers(0, 60, size=(72, 96, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 50), rng.integers(0, 70)
            im[y : y + 20, x : x + 25] = rng.integers(80, 255, size=3)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised tiny model with category names, saved as a training checkpoint."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny"), ["data.scale=0.1"])
    run = Training(cfg, torch.device("cpu"), load_backbone_weights=False, categories=CATEGORIES)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000000"
    save_checkpoint(directory, run.payload(cfg.to_dict()), {})
    return directory


@pytest.fixture(scope="module")
def detector(checkpoint) -> Detector:
    return Detector.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def service(ray_local, hard_timeout, checkpoint):
    """The application on a free loopback port: one CPU replica, batches of up to 4 images gathered for 0.3 s."""
    from ray import serve

    from ddetr.deploy.serve import ServeSettings, deploy

    settings = ServeSettings(checkpoint=str(checkpoint), port=free_port(), max_batch_size=MAX_BATCH, batch_wait_s=0.3,
                             min_replicas=1, max_replicas=1, cpus_per_replica=0.5, use_gpu=False, threshold=0.0,
                             max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS,
                             max_request_pixels=MAX_REQUEST_PIXELS, max_inflight_pixels=2 * MAX_REQUEST_PIXELS,
                             request_timeout_s=REQUEST_TIMEOUT_S)  # fmt: skip
    try:
        with hard_timeout(150):
            assert deploy(settings) is False  # the suite's Ray was up: nothing local started
        yield settings
    finally:
        serve.shutdown()


def between(direct: dict[str, torch.Tensor], k: int) -> float:
    """A threshold that keeps the `k` best of these detections: halfway between the k-th and the next score."""
    scores = direct["scores"].sort(descending=True).values
    assert scores[k - 1] > scores[k]
    return float(scores[k - 1] + scores[k]) / 2


def assert_same_detections(result: dict, direct: dict[str, torch.Tensor], image: np.ndarray, threshold: float) -> None:
    assert (result["width"], result["height"]) == (image.shape[1], image.shape[0])
    keep = direct["scores"] >= threshold
    scores, labels, boxes = direct["scores"][keep], direct["labels"][keep], direct["boxes"][keep]
    order = torch.argsort(scores, descending=True)
    found = result["detections"]
    assert len(found) == len(order)
    np.testing.assert_allclose([d["score"] for d in found], scores[order].numpy(), atol=1e-5)
    assert [d["category_id"] for d in found] == labels[order].tolist()
    names = {c["id"]: c["name"] for c in CATEGORIES}
    assert [d["category_name"] for d in found] == [names.get(int(i)) for i in labels[order]]
    x0, y0, x1, y1 = boxes[order].unbind(1)
    np.testing.assert_allclose([d["bbox"] for d in found], torch.stack([x0, y0, x1 - x0, y1 - y0], 1), atol=1e-3)


def test_detections_over_http_equal_the_detector(service, detector, images):
    url = f"{service.url}/detect"
    status, health = get(f"{service.url}/healthz")
    assert status == 200 and health["status"] == "ok" and health["device"] == "cpu"

    status, result = post(url, encode(images[0]), "image/png")  # the settings' threshold: 0, every detection
    assert status == 200 and len(result["detections"]) == 100  # the post-processing's top 100
    assert_same_detections(result, detector.predict([images[0]])[0], images[0], 0.0)

    # A JPEG is detected on its decoded pixels (lossy: not the array it was made from).
    jpeg = encode(images[1], "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    direct = detector.predict([decoded])[0]
    threshold = between(direct, 20)
    status, result = post(f"{url}?threshold={threshold}", jpeg, "image/jpeg")
    assert status == 200 and len(result["detections"]) == 20
    assert_same_detections(result, direct, decoded, threshold)

    # A JSON list of base64 images: one result per image, in order.
    body = json.dumps([base64.b64encode(encode(im)).decode() for im in images[2:5]]).encode()
    direct = detector.predict(images[2:5])
    threshold = between(direct[0], 30)
    status, results = post(f"{url}?threshold={threshold}", body, "application/json")
    assert status == 200 and len(results) == 3 and len(results[0]["detections"]) == 30
    for result, det, image in zip(results, direct, images[2:5], strict=True):
        assert_same_detections(result, det, image, threshold)


def _big_noise_png() -> bytes:
    data = encode(np.random.default_rng(1).integers(0, 255, size=(200, 200, 3), dtype=np.uint8))
    assert len(data) > MAX_IMAGE_BYTES
    return data


def _one_colour_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A large image in a small file: what a pixel limit checked before decoding is for."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="GIF")
    return buffer.getvalue()


BAD_REQUESTS = {  # name: (path and query, body, content type, status, words of the message)
    "empty body": ("/detect", b"", "image/png", 400, "empty"),
    "not an image": ("/detect", b"this is not a JPEG", "image/jpeg", 400, "not a readable JPEG or PNG"),
    "truncated JPEG": ("/detect", None, "image/jpeg", 400, "not a readable JPEG or PNG"),
    "over the byte limit": ("/detect", _big_noise_png(), "image/png", 413, f"limit of {MAX_IMAGE_BYTES}"),
    "over the pixel limit": ("/detect", _one_colour_png(5100, 5100, "L"), "image/png", 413, "5100x5100"),
    "wrong content type": ("/detect", b"hello", "text/plain", 415, "'text/plain'"),
    "no content type": ("/detect", b"hello", None, 415, "content type"),
    "a GIF": ("/detect", _gif(), "image/png", 415, "GIF"),
    "bad JSON": ("/detect", b"[not json", "application/json", 400, "not JSON"),
    "JSON not a list": ("/detect", b'{"image": "aGk="}', "application/json", 400, "list of base64"),
    "empty JSON list": ("/detect", b"[]", "application/json", 400, "non-empty list"),
    "bad base64": ("/detect", b'["@@@"]', "application/json", 400, "image 0 of the list is not valid base64"),
    "bad threshold": ("/detect?threshold=high", None, "image/png", 400, "threshold='high'"),
    "threshold over 1": ("/detect?threshold=2", None, "image/png", 400, "within [0, 1]"),
    "unknown path": ("/classify", b"x", "image/png", 404, "/classify"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_and_the_replica_keeps_serving(service, images, case):
    path, body, content_type, status, words = BAD_REQUESTS[case]
    good = encode(images[0])
    if body is None:
        body = encode(images[0], "JPEG")[:300] if case == "truncated JPEG" else good
    code, answer = post(service.url + path, body, content_type)
    assert code == status, answer
    assert words in answer["error"]
    code, answer = post(f"{service.url}/detect", good, "image/png")
    assert code == 200 and len(answer["detections"]) == 100


def test_get_on_detect_is_refused(service):
    code, answer = get(f"{service.url}/detect")
    assert code == 405 and "use POST" in answer["error"]


def test_concurrent_requests_are_batched(service, detector, images):
    before = get(f"{service.url}/healthz")[1]
    bodies = [encode(images[i % len(images)]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(f"{service.url}/detect", b, "image/png"), bodies))
    after = get(f"{service.url}/healthz")[1]
    direct = detector.predict(images)
    for i, (code, result) in enumerate(answers):
        assert code == 200
        assert_same_detections(result, direct[i % len(images)], images[i % len(images)], 0.0)
    assert after["images"] - before["images"] == 8
    new = {int(n): c - before["batches"].get(n, 0) for n, c in after["batches"].items()}
    assert sum(n * c for n, c in new.items()) == 8
    assert max(n for n, c in new.items() if c) > 1, f"no batch of more than one image: {new}"
    assert max(after["batches"], key=int) <= str(MAX_BATCH)


def test_a_list_of_huge_images_is_refused_before_decoding_and_memory_stays_bounded(service):
    huge = _one_colour_png(4900, 4900)  # 24 M pixels in ~80 KB: 32 of them were 2.3 GB of arrays
    before = get(f"{service.url}/healthz")[1]
    body = json.dumps([base64.b64encode(huge).decode()] * 32).encode()
    assert len(body) < 4 * 1024 * 1024
    code, answer = post(f"{service.url}/detect", body, "application/json", timeout=20)
    assert code == 413, answer
    assert f"over the limit of {MAX_REQUEST_PIXELS} pixels per request: its first 2 images hold" in answer["error"]
    # One of them alone is decoded reduced to the model's input size and detected in its own pixels.
    code, result = post(f"{service.url}/detect", huge, "image/png", timeout=20)
    assert code == 200 and (result["width"], result["height"]) == (4900, 4900) and len(result["detections"]) == 100
    assert max(d["bbox"][0] + d["bbox"][2] / 2 for d in result["detections"]) > 80  # not the reduced image's pixels
    after = get(f"{service.url}/healthz")[1]
    assert after["inflight_pixels"] == 0  # every request's pixels given back
    # Bounded: the old replica kept 32 full-size arrays (2.3 GB); the peak now grows by about one decoded image.
    assert after["peak_rss_bytes"] - before["rss_bytes"] < 1024**3, (before, after)


def test_a_sliver_of_an_image_is_answered_and_so_is_the_next(service, images):
    code, result = post(f"{service.url}/detect", encode(np.full((1, 3000, 3), 90, np.uint8)), "image/png")
    assert code == 200, result
    assert (result["width"], result["height"]) == (3000, 1) and len(result["detections"]) == 100
    code, result = post(f"{service.url}/detect", encode(images[0]), "image/png")
    assert code == 200 and len(result["detections"]) == 100


def test_a_client_that_stalls_its_body_is_cut_at_the_timeout(service, images):
    good = encode(images[0])
    head = (f"POST /detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(good)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", service.port), timeout=REQUEST_TIMEOUT_S + 30) as client:
        client.sendall(head + good[:100])  # then nothing more
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert f"the body did not arrive within {REQUEST_TIMEOUT_S:g} s".encode() in answer
    code, result = post(f"{service.url}/detect", good, "image/png")
    assert code == 200 and len(result["detections"]) == 100


def test_replicas_that_cannot_be_scheduled_are_given_up_on(service, checkpoint):
    from ray import serve

    from ddetr.deploy.serve import ReplicasNotRunning, ServeSettings, build_app, replica_resources, wait_until_running

    settings = ServeSettings(checkpoint=str(checkpoint), cpus_per_replica=64, use_gpu=False, name="too_big")
    serve._run(build_app(settings), _blocking=False, name=settings.name, route_prefix="/too_big")
    try:
        with pytest.raises(ReplicasNotRunning, match=r"after 2 s .*each asks for \{'CPU': 64, 'GPU': 0\}, the cluster"):
            wait_until_running(settings.name, 2, replica_resources(settings))
    finally:
        serve.delete(settings.name, _blocking=False)  # a blocking delete waits ~20 s for the pending replica


def test_the_in_flight_budget_refuses_what_does_not_fit_until_it_is_given_back():
    from ddetr.deploy.admission import BadRequest, PixelBudget

    budget = PixelBudget(100)
    budget.take(60)
    with pytest.raises(BadRequest, match="holds 60 pixels .* this request's 50 would pass its limit of 100") as err:
        budget.take(50)
    assert (err.value.status, err.value.retry_after_s, budget.used) == (503, 1, 60)
    budget.give(60)
    budget.take(100)
    assert budget.used == 100


def test_settings_are_checked():
    from ddetr.deploy.serve import ServeSettings

    with pytest.raises(ConfigError, match="min_replicas <= max_replicas"):
        ServeSettings(checkpoint="x", min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="max_batch_size must be at least 1"):
        ServeSettings(checkpoint="x", max_batch_size=0)
    settings = ServeSettings.from_args({"checkpoint": "x", "max_batch_size": "4", "use_gpu": "false", "port": 9000})
    assert (settings.max_batch_size, settings.use_gpu, settings.port) == (4, False, 9000)
    with pytest.raises(ConfigError, match="max_inflight_pixels .* must be at least max_request_pixels"):
        ServeSettings(checkpoint="x", max_request_pixels=10, max_inflight_pixels=5)
    with pytest.raises(ConfigError, match="unknown serve settings"):
        ServeSettings.from_args({"checkpoint": "x", "batch": 4})


@pytest.mark.parametrize("use_gpu", [True, False])
def test_the_application_autoscales_within_the_settings(use_gpu):
    from ddetr.deploy.serve import ServeSettings, build_app

    settings = ServeSettings(checkpoint="x", max_batch_size=6, min_replicas=0, max_replicas=5, use_gpu=use_gpu,
                             cpus_per_replica=1.5)  # fmt: skip
    deployment = build_app(settings)._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (0, 1, 5)
    assert scaling.target_ongoing_requests == 6  # a full batch per replica
    assert deployment.max_ongoing_requests >= 2 * 6  # a batch running and the next one filling
    assert deployment.ray_actor_options == {"num_cpus": 1.5, "num_gpus": 1 if use_gpu else 0}
    assert deployment.init_args[1] == ("cuda" if use_gpu else "cpu")


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--checkpoint", "/no/such/checkpoint"], "no such file or folder: /no/such/checkpoint"),
     (["--checkpoint", ".", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas <= max_replicas"),
     (["--checkpoint", ".", "--port", "0"], "port must be within 1-65535")],
)  # fmt: skip
def test_ddetr_serve_user_errors_are_one_line(args, expected, capsys):
    from ddetr.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_ddetr_serve_on_a_running_cluster_redeploys_and_returns(service, ray_local, checkpoint, detector, images):
    direct = detector.predict([images[0]])[0]
    threshold = between(direct, 10)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "ddetr.cli", "-q", "serve", "--checkpoint", str(checkpoint),
               "--port", str(service.port), "--max-batch-size", "2", "--max-replicas", "1",
               "--cpus-per-replica", "0.5", "--cpu", "--threshold", str(threshold)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert f"{service.url}/detect" in done.stdout and "keeps running on the cluster" in done.stdout
    code, health = get(f"{service.url}/healthz")
    assert code == 200 and health["max_batch_size"] == 2
    code, result = post(f"{service.url}/detect", encode(images[0]), "image/png")
    assert code == 200 and len(result["detections"]) == 10  # the new default threshold
    assert_same_detections(result, direct, images[0], threshold)
