"""What a `POST /detect` request may hold, and how it becomes images: checked from the headers before anything is
decoded, decoded reduced, counted against a replica's budget of pixels in flight.

The stages of a request (`serve.DetectorServer` runs them, the CPU-heavy ones on its decoding threads):

  1. `media_type`, `parse_threshold`, `read_body`: refused (415, 400, 413) before the body is read or as soon as it
     passes its limit;
  2. `probe_request`: each image's header (`Image.open` reads no pixels): format, bytes, width x height against the
     per-image limits, and the pixels of all the request's images against `max_request_pixels` (413 at the first
     image past it, nothing decoded);
  3. `PixelBudget.take`: the request's pixels against what the replica already holds (503 when they do not fit);
  4. `decode_probes`: each image decoded upright and reduced to the model's input size (`images.decode_reduced`), so
     no full-resolution array outlives its own decoding; a file that still fails is this request's 400.

Pixels are counted as the headers give them, whatever the reduction: they are what decoding has to go through.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from starlette.requests import Request

from ddetr.data.images import UNREADABLE, decode_reduced, open_image

if TYPE_CHECKING:
    from ddetr.deploy.serve import ServeSettings

IMAGE_TYPES = ("image/jpeg", "image/png")
IMAGE_FORMATS = ("JPEG", "PNG")  # what PIL must find in the bytes, whatever the content type said


class BadRequest(Exception):
    """A request the service refuses: `status` is the HTTP status (4xx; 503 when the replica is too busy for it, with
    `retry_after_s`), the message says why."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Probe:
    """One image of a request, its header read: `data` its bytes, `width` x `height` as stored, `where` its name in
    messages ("the body", "image 3 of the list")."""

    data: bytes
    width: int
    height: int
    where: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_image(data: bytes, max_bytes: int, max_pixels: int, where: str = "the body") -> Probe:
    """The header of one JPEG or PNG, checked against the per-image limits; BadRequest (400, 413, 415) naming
    `where` otherwise. Reads no pixels."""
    if not data:
        raise BadRequest(400, f"{where} is empty: send the bytes of a JPEG or PNG image")
    if len(data) > max_bytes:
        raise BadRequest(413, f"{where} has {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with open_image(data) as picture:  # reads the header only
            kind, (width, height) = picture.format, picture.size
    except Image.DecompressionBombError as err:
        raise BadRequest(413, f"{where}: {err}") from None
    except UNREADABLE as err:  # truncated or not an image
        raise BadRequest(400, f"{where} is not a readable JPEG or PNG image ({err})") from None
    if kind not in IMAGE_FORMATS:
        raise BadRequest(415, f"{where} is a {kind} image; send JPEG or PNG")
    if width * height > max_pixels:
        raise BadRequest(413, f"{where} is {width}x{height} pixels, over the limit of {max_pixels}")
    return Probe(data, width, height, where)


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header ("image/png; q=1" -> "image/png"), refused (415) unless served."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in (*IMAGE_TYPES, "application/json"):
        raise BadRequest(415, f"content type {kind or '(none)'!r}: send image/jpeg, image/png, or application/json "
                              "with a list of base64 images")  # fmt: skip
    return kind


def probe_request(kind: str, body: bytes, settings: ServeSettings) -> tuple[list[Probe], bool]:
    """(the images' probes, whether the request sent a JSON list) of a /detect body of media type `kind`.

    Raises:
        BadRequest: 400 (not JSON, not base64, not an image), 413 (over a limit, the request's pixels included:
            refused at the first image past `settings.max_request_pixels`), 415 (not a JPEG or PNG).
    """
    max_bytes, max_pixels = settings.max_image_bytes, settings.max_image_pixels
    if kind in IMAGE_TYPES:
        probe = probe_image(body, max_bytes, max_pixels)
        check_request_pixels(probe.pixels, settings.max_request_pixels, 1)
        return [probe], False
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
    probes, pixels = [], 0
    for i, item in enumerate(items):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"image {i} of the list is not valid base64") from None
        probes.append(probe_image(data, max_bytes, max_pixels, where=f"image {i} of the list"))
        pixels += probes[-1].pixels
        check_request_pixels(pixels, settings.max_request_pixels, i + 1)
    return probes, True


def check_request_pixels(pixels: int, limit: int, images: int) -> None:
    if pixels > limit:
        first = "its first image holds" if images == 1 else f"its first {images} images hold"
        raise BadRequest(413, f"the request is over the limit of {limit} pixels per request: {first} {pixels}; "
                              "send fewer or smaller images per request")  # fmt: skip


def decode_probes(probes: list[Probe], size: int, max_size: int | None) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Each probed image decoded upright and reduced for a model reading shorter side `size`, longer at most
    `max_size`: (pixels, (h, w) of the whole upright image) (`images.decode_reduced`); BadRequest (400) naming the
    first that fails."""
    decoded = []
    for probe in probes:
        try:
            decoded.append(decode_reduced(probe.data, size, max_size))
        except UNREADABLE as err:
            raise BadRequest(400, f"{probe.where} is not a readable JPEG or PNG image ({err})") from None
    return decoded


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


def detections_json(
    det: dict[str, Any], size: tuple[int, int], threshold: float, names: dict[int, str] | None
) -> dict[str, Any]:
    """One image's result: its upright (h, w) `size` and its detections scoring at least `threshold`, best first,
    boxes xywh in its pixels."""
    scores, labels, boxes = det["scores"].numpy(), det["labels"].numpy(), det["boxes"].numpy()
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= threshold]
    found = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        label = int(labels[i])
        found.append({"category_id": label, "category_name": (names or {}).get(label),
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])})  # fmt: skip
    return {"width": int(size[1]), "height": int(size[0]), "detections": found}


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


class PixelBudget:
    """The pixels of the requests a replica holds (decoding, waiting for or in detection) against its limit. Used
    from the replica's event loop only, so taking is one step: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, pixels: int) -> None:
        """Count `pixels` in; BadRequest (503, retry later) when they do not fit beside what is held."""
        if self.used + pixels > self.limit:
            raise BadRequest(503, f"the replica holds {self.used} pixels of requests in flight, and this request's "
                                  f"{pixels} would pass its limit of {self.limit}: retry later",
                             retry_after_s=1)  # fmt: skip
        self.used += pixels

    def give(self, pixels: int) -> None:
        self.used -= pixels
