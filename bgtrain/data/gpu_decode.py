"""``data.decode: gpu`` for the WebDataset backend: nvJPEG batch decode, resize and flip on the GPU.

The loader workers then only read tars and labels; the JPEG bytes travel to the training process,
which decodes a whole batch with ``torchvision.io.decode_jpeg(device="cuda")``. Images of one size
are resized together (bilinear with antialiasing, as PIL's BILINEAR does when shrinking); the Loader
mirrors rows while normalising, with the same (seed, epoch, sample) rule as every other path.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a DeprecationWarning);
they are still the pinned version's nvJPEG entry point, and this module is the one place to change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

if TYPE_CHECKING:
    from bgtrain.data import Loader


def decode_resize(jpegs: list[bytes], loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG bytes -> (uint8 (B, S, S, 3) CUDA images, bool (B,) CPU "decoded" mask) for ``loader``'s epoch.

    A sample nvJPEG cannot decode (or an empty placeholder) gives a black image and ``False``, so the
    caller can count it as corrupt instead of crashing the run.
    """
    device = loader.device if loader.device.type == "cuda" else torch.device("cuda")
    return decode_batch(jpegs, loader.cfg.image_size, device)


def decode_batch(jpegs: list[bytes], size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_resize` on any device (the CPU too, for tests)."""
    decoded = torch.zeros(len(jpegs), dtype=torch.bool)
    out = torch.zeros((len(jpegs), 3, size, size), dtype=torch.uint8, device=device)
    todo = [i for i, b in enumerate(jpegs) if len(b) > 0]
    lookup: dict[int, torch.Tensor] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in zip(todo, _decode(jpegs, todo, device)):
        if img is not None:
            lookup[i] = img
            by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
    if by_shape:
        # One resize call per source size, written into the batch through one row index built on the host and
        # sent once with non_blocking: indexing a device tensor with a Python list copies the index to the
        # device per size, each a blocking copy that waits for the queued training step.
        rows = [i for group in by_shape.values() for i in group]
        index = torch.tensor(rows, dtype=torch.int64)  # host-side (CPU)
        on_device = index.to(device, non_blocking=True)
        start = 0
        for group in by_shape.values():
            resized = resize_uint8(torch.stack([lookup[i] for i in group]), size)
            out.index_put_((on_device[start:start + len(group)],), resized)
            start += len(group)
        decoded[index] = True  # decoded: host-side (CPU)
    return out.permute(0, 2, 3, 1), decoded  # the raw batch layout (B, H, W, 3); Loader._finish normalises


def _decode(jpegs: list[bytes], todo: list[int], device: torch.device) -> list[torch.Tensor | None]:
    """Batched nvJPEG decode; if the batch fails, decode one by one to isolate the bad samples."""
    data = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in todo]
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    images: list[torch.Tensor | None] = []
    for d in data:
        try:
            images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images.append(None)
    return images


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size): bilinear with antialiasing, no crop, no aspect."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)
