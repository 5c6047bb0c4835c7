"""Images as cameras write them: turned upright by their EXIF orientation, 16-bit depth scaled to 8 bits, and
decoded no larger than the model needs.

Every reader of image bytes goes through here: conversion (`upright_size`, `validate.check_image_bytes`), training
(`decode.decode_image`), drawing and batch inference (`decode.decode_rgb`, `decode_reduced`), `Detector.predict_files`
and `ddetr serve`.

**Orientation.** Phones and cameras store a portrait photo as landscape pixels plus an EXIF tag (0x0112, values 1-8)
saying how to turn them upright. Viewers and annotation tools (CVAT, Label Studio, VIA, RectLabel) show the photo
turned, so the boxes drawn there are in the upright frame. ddetr assumes that frame everywhere: a COCO record's
width/height and boxes describe the upright image, shards record the upright size, decoding turns the pixels upright
before anything else, and detections come back in upright pixels. A record that gives the stored (unturned) size of a
quarter-turned photo is refused at conversion, since its boxes could be in either frame.

**Depth.** PNGs of 16 bits per sample open as PIL modes "I;16*" or "I"; `convert("RGB")` clips them at 255 (a
mid-grey of 32768 turns white), so they are scaled: 0..65535 becomes 0..255.

**Reduction.** A 4900x4900 image for a model that reads 800x1333 need not be decoded whole: JPEGs are decoded at the
smallest DCT scale (1, 1/2, 1/4, 1/8) that still covers the model's input size (`Image.draft`), other formats are
reduced by the largest integer factor that does (`Image.reduce`), so only reduced arrays outlive the decoding.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from ddetr.data.transforms import resized_size

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that turns the stored pixels upright (PIL.ImageOps.exif_transpose's table).
TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What PIL raises for bytes that are not a readable image (truncated, corrupt, a format it cannot read, a bomb).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(data: bytes) -> Image.Image:
    """The image in `data`, opened: its header read, its pixels not yet decoded."""
    return Image.open(io.BytesIO(data))


def orientation(picture: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) where it has none or a broken one."""
    try:
        value = picture.getexif().get(ORIENTATION_TAG, 1)
    except UNREADABLE:  # a broken EXIF block: the pixels may still be fine
        return 1
    return value if value in TURNS else 1


def swaps_sides(turn: int) -> bool:
    """Whether orientation `turn` is a quarter turn (5-8): the upright width is the stored height."""
    return turn >= 5


def upright_size(picture: Image.Image, turn: int | None = None) -> tuple[int, int]:
    """(width, height) of an opened image as shown upright (`turn`: its orientation, read when not given)."""
    w, h = picture.size
    return (h, w) if swaps_sides(orientation(picture) if turn is None else turn) else (w, h)


def upright(picture: Image.Image, turn: int) -> Image.Image:
    """The pixels of `picture` turned upright by orientation `turn`."""
    return picture.transpose(TURNS[turn]) if turn in TURNS else picture


def to_rgb8(picture: Image.Image) -> Image.Image:
    """`picture` as 8-bit RGB; 16-bit samples scaled (0..65535 -> 0..255, rounded), not clipped at 255."""
    if picture.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(picture).astype(np.int64), 0, 65535)  # "I" holds int32; PNG's 16 bits fit
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return picture if picture.mode == "RGB" else picture.convert("RGB")


def decode_upright(data: bytes) -> np.ndarray:
    """The (H, W, 3) uint8 RGB pixels of an encoded image, upright, at full size.

    Raises:
        one of `UNREADABLE` for bytes that are not a readable image.
    """
    with open_image(data) as picture:
        return np.asarray(upright(to_rgb8(picture), orientation(picture)))


def decode_reduced(data: bytes, size: int, max_size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """An encoded image decoded no larger than a model resizing to shorter side `size`, longer at most `max_size`
    (`transforms.resized_size`) needs, upright.

    Returns:
        the (h', w', 3) uint8 RGB pixels, with h' >= the model's input height and w' >= its width (smaller only where
        the image is), and the (h, w) of the whole upright image: a detection's boxes in normalised coordinates of
        the reduced image are those of the whole one (`Detector.predict(images, sizes)`).

    Raises:
        one of `UNREADABLE` for bytes that are not a readable image.
    """
    with open_image(data) as picture:
        turn = orientation(picture)
        w, h = upright_size(picture, turn)
        oh, ow = resized_size(h, w, size, max_size)
        if swaps_sides(turn):  # the decoder works in the stored frame
            oh, ow = ow, oh
        if picture.format == "JPEG" and (ow < picture.width or oh < picture.height):
            picture.draft("RGB", (ow, oh))  # the smallest DCT scale at least (ow, oh): both sides stay covered
        pixels = to_rgb8(picture)
        factor = min(pixels.width // max(ow, 1), pixels.height // max(oh, 1))
        if factor >= 2:  # what the DCT scale did not do (every format but JPEG): a box filter, still covering
            pixels = pixels.reduce(factor)
        return np.asarray(upright(pixels, turn)), (h, w)
