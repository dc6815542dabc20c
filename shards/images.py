"""Decode-check and normalise one image for the shards.

DALI kills the whole pipeline on one corrupt JPEG and has no skip, so every image is fully decoded
here first. An RGB JPEG that needs no rotation and no shrinking is stored byte for byte; anything
else (EXIF-rotated, CMYK, greyscale, PNG, too large, ...) is re-encoded once, deterministically.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, not be padded grey


class Rejected(Exception):
    """An input that cannot go into a shard; ``str(e)`` is the reason written to rejected.jsonl."""


def libjpeg_warnings(data: bytes) -> list[str]:
    """What libjpeg says while fully decoding ``data``: [] for a clean JPEG.

    Corrupt entropy data (zeroed or flipped scan bytes) is only a *warning* to libjpeg: PIL decodes such a
    file to a damaged picture without a word, and DALI later dies on it. torchvision's decoder leaves
    libjpeg's default message handler in place, which writes the warning to file descriptor 2, so stderr
    is captured around the call; anything else written meanwhile (a progress bar) is passed on.
    """
    import torch
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation note for its image codecs
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with tempfile.TemporaryFile() as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                decode_jpeg(buf)
                error = None
            except RuntimeError as e:
                error = str(e).splitlines()[0]
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    said = [line.strip() for line in text.splitlines() if "JPEG" in line or "marker" in line or "Huffman" in line]
    rest = "".join(line + "\n" for line in text.splitlines() if line.strip() and line.strip() not in said)
    if rest:
        sys.stderr.write(rest)
    return said + ([error] if error else [])


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to drop a good picture
        return 1


def target_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """Size with the longer side at most ``max_side``, aspect kept (at least 1 pixel)."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def prepare(data: bytes, max_side: int | None = None, quality: int = 90) -> tuple[bytes, list[str]]:
    """Checked RGB JPEG bytes for ``data`` and the list of changes made (empty when stored as is).

    Raises :class:`Rejected` for empty, non-image, truncated or undecodable input.
    """
    if not data:
        raise Rejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            im: Image.Image = Image.open(io.BytesIO(data))
            fmt, mode, size = im.format, im.mode, im.size
            orientation = _orientation(im)
            new_size = target_size(size, max_side)
            if fmt == "JPEG" and new_size != size:
                im.draft("RGB", new_size)  # DCT-domain downscale: decodes every block, far fewer pixels
            im.load()
    except UnidentifiedImageError:
        raise Rejected(f"not an image file (starts with {data[:16]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways of saying truncated or corrupt
        raise Rejected(f"cannot decode {fmt if 'fmt' in locals() else 'image'}: {e}") from None
    if min(size) < 1:
        raise Rejected(f"empty image of size {size}")
    if fmt == "JPEG" and (said := libjpeg_warnings(data)):
        raise Rejected(f"libjpeg reports: {'; '.join(said[:2])}")

    changes = []
    if fmt != "JPEG":
        changes.append(f"format {fmt}")
    if mode != "RGB":
        changes.append(f"mode {mode}")
    if orientation != 1:
        changes.append(f"exif orientation {orientation}")
    if new_size != size:
        changes.append(f"shrink {size[0]}x{size[1]}")
    if not changes:
        return data, changes
    try:
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            background = Image.new("RGB", im.size, (255, 255, 255))  # transparent areas become white
            background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            im = background
        im = im.convert("RGB")
        final = target_size(im.size, max_side)
        if im.size != final:
            im = im.resize(final, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        # Fixed settings and no metadata: the same input always gives the same bytes.
        im.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    except (OSError, ValueError) as e:
        raise Rejected(f"cannot convert to RGB JPEG: {e}") from None
    return buf.getvalue(), changes


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Fully decode a stored JPEG (as ``verify`` does); returns its size or raises :class:`Rejected`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode != "RGB":
                raise Rejected(f"stored image is {im.format} {im.mode}, expected an RGB JPEG")
            im.load()
            size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Rejected(f"cannot decode stored JPEG: {e}") from None
    if said := libjpeg_warnings(data):
        raise Rejected(f"libjpeg reports: {'; '.join(said[:2])}")
    return size
