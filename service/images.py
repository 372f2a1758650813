"""Given images (edits' ``image`` and ``mask``): bytes or base64 to a decoded image, every failure a
client error that names its field, and nothing decoded that is not bounded first.

- base64 (optionally a ``data:image/…;base64,`` URL) is checked and sized before it is decoded;
- more bytes than the service's ``max_image_bytes`` is :class:`TooLarge` (413);
- only PNG, JPEG and WebP are opened, and the header's width × height is checked against
  ``max_image_pixels`` before any pixel is decoded (a decompression bomb, a tiny file that would
  decode to a huge image, costs nothing);
- a file that is not an image, or is truncated or corrupt, is :class:`BadImage` (422).

Callers run this off the event loop (it decodes).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class BadImage(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class TooLarge(ValueError):
    def __init__(self, field: str, size: int, limit: int):
        super().__init__(f"{field} is {size} bytes; at most {limit}")
        self.field, self.size, self.limit = field, size, limit


def from_base64(text: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or data URL (sized before decoding)."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    if (len(text) * 3) // 4 - text[-2:].count("=") > max_bytes:
        raise TooLarge(field, (len(text) * 3) // 4, max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(field, "is not valid base64 (a PNG, JPEG or WebP image, or a data: URL of one)") from None


def decode(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """An image, fully decoded, from its file bytes (the module's bounds)."""
    if len(data) > max_bytes:
        raise TooLarge(field, len(data), max_bytes)
    if not data:
        raise BadImage(field, "is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError:
            raise BadImage(field, f"decodes to more than {max_pixels} pixels") from None
        except Exception:
            raise BadImage(field, "is not a PNG, JPEG or WebP image") from None
        w, h = img.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise BadImage(field, f"is {w}x{h} = {w * h} pixels; at most {max_pixels}")
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(field, f"decodes to more than {max_pixels} pixels") from None
        except Exception:
            raise BadImage(field, "could not be decoded (truncated or corrupt)") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return img
