"""What an upload's bytes are: the type they show (puremagic), and for an image its size and a
small thumbnail (Pillow). Both read the file the upload became; neither trusts the client.

A decompression bomb (an image that claims more than ``max_pixels``) and a file Pillow cannot
decode get no thumbnail; the upload itself stands (its type was confirmed from its bytes)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import puremagic
from PIL import Image, ImageOps

__all__ = ["SNIFF_BYTES", "ImageFacts", "describe_image", "shows_type"]

SNIFF_BYTES = 8192
"""How much of the start of a file ``shows_type`` reads."""

# Names clients use for the same type, and families whose members share a container: an
# ISO media file's brand says video or audio loosely, so either declared name is accepted.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "audio/mp3": "audio/mpeg",
    "audio/x-m4a": "audio/mp4",
}
_FAMILIES = [
    frozenset({"video/mp4", "audio/mp4", "video/quicktime", "audio/aac"}),
    frozenset({"image/heic", "image/heif"}),  # an iPhone photo's brand "heic" is read as HEIF
]
_ORIENTATION = 0x0112  # the EXIF tag
_THUMBNAILED = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def canonical_type(content_type: str) -> str:
    name = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(name, name)


def shows_type(head: bytes, declared: str) -> bool:
    """Whether the first bytes of a file (SNIFF_BYTES of them) are of the declared type."""
    declared = canonical_type(declared)
    try:
        found = {canonical_type(m.mime_type) for m in puremagic.magic_string(head) if m.mime_type}
    except puremagic.PureError:
        return False
    if declared in found:
        return True
    return any(declared in family and found & family for family in _FAMILIES)


@dataclass(frozen=True, slots=True)
class ImageFacts:
    width: int  # as displayed (after the EXIF orientation)
    height: int
    thumbnail: bytes  # JPEG, the longer side at most thumbnail_px


def describe_image(path: Path, content_type: str, *, thumbnail_px: int, max_pixels: int) -> ImageFacts | None:
    """The displayed size and a thumbnail of the image at path; None when it is not an image
    this server thumbnails, is larger than max_pixels, or does not decode. Blocking: run it in
    a thread."""
    if canonical_type(content_type) not in _THUMBNAILED:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width <= 0 or height <= 0 or width * height > max_pixels:
                    return None
                if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width  # shown turned a quarter
                image.draft("RGB", (thumbnail_px * 2, thumbnail_px * 2))  # JPEG: decode at a fraction of the size
                small = ImageOps.exif_transpose(image).convert("RGB")
                small.thumbnail((thumbnail_px, thumbnail_px))
                out = io.BytesIO()
                small.save(out, "JPEG", quality=60, optimize=True)
                return ImageFacts(width=width, height=height, thumbnail=out.getvalue())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
