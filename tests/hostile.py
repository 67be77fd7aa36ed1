"""Hostile and awkward frames shared by the runtime's tests (built here, never downloaded)."""

from __future__ import annotations

import io
import struct
import threading
import zlib

from PIL import Image


def png_with_size(width: int, height: int, *, rows: int = 0) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB). With ``rows`` > 0 the IDAT
    really holds that many zero rows (compressed to almost nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\x00" * (width * 3 + 1)
    idat = (
        b"".join(packer.compress(row) for _ in range(rows))
        if rows
        else packer.compress(b"\x00" * 64)
    )
    idat += packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


class BlockingImage(Image.Image):
    """A frame whose decoding blocks until ``gate`` is set: a slow decode on demand."""

    def __init__(self, gate: threading.Event, size: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self._mode, self._size = "RGB", size
        self.gate = gate

    def load(self):
        self.gate.wait(30)
        self.im = Image.new("RGB", self.size).im
        return None


class ExhaustingImage(Image.Image):
    """A frame whose decoding runs out of memory (Pillow raises MemoryError then)."""

    def __init__(self) -> None:
        super().__init__()
        self._mode, self._size = "RGB", (64, 64)

    def load(self):
        raise MemoryError("cannot allocate the decoded frame")
