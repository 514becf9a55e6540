"""Image sizes read from file headers, without decoding.

A decoder allocates the whole image that a header declares before it reads a pixel, so a
100-byte PNG declaring 30000 x 30000 costs 2.7 GB. :func:`declared_size` reads what the
header declares, for the formats OpenCV reads that can declare large sizes (PNG, JPEG, BMP,
GIF, WebP, PNM), so that the size is checked against :mod:`caffelayers.limits` first. Other
formats give None and are left to the decoder (OpenCV refuses more than 2^30 pixels).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO, Optional, Tuple, Union

#: JPEG start-of-frame markers (C0-CF without DHT C4, JPG C8 and DAC CC): they hold the size.
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: JPEG markers without a length field.
_BARE = set(range(0xD0, 0xD9)) | {0x01}


def declared_size(source: Union[str, Path, bytes]) -> Optional[Tuple[int, int]]:
    """``(width, height)`` that an image file (a path, or its bytes) declares, or None when
    the format is not one of those read here or the header is cut short."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(source)))
    try:
        with open(source, "rb") as file:
            return _read(file)
    except OSError:
        return None  # the decoder says what is wrong with the file


def _read(file: BinaryIO) -> Optional[Tuple[int, int]]:
    head = file.read(32)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"BM"):
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", head[18:22])
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:2] == b"\xff\xd8":
            file.seek(2)
            return _jpeg(file)
        if head[:1] == b"P" and head[1:2] in b"123456":
            return _pnm(head + file.read(4096))
    except struct.error:  # a header cut short
        return None
    return None


def _webp(head: bytes) -> Optional[Tuple[int, int]]:
    kind = head[12:16]
    if kind == b"VP8X":  # 24-bit canvas size minus one
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    if kind == b"VP8L":  # 14 bits each, minus one, after the signature byte
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg(file: BinaryIO) -> Optional[Tuple[int, int]]:
    """Walk the segments to the first start-of-frame."""
    while True:
        byte = file.read(1)
        if byte != b"\xff":
            return None
        marker = file.read(1)
        while marker == b"\xff":  # fill bytes
            marker = file.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in _BARE:
            continue
        if code in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = struct.unpack(">H", file.read(2))[0]
        if length < 2:  # a length counts its own two bytes: anything less is damage
            return None
        if code in _SOF:
            height, width = struct.unpack(">xHH", file.read(5))
            return width, height
        file.seek(length - 2, io.SEEK_CUR)


def _pnm(head: bytes) -> Optional[Tuple[int, int]]:
    """Netpbm: the magic, then width and height as decimal text, comments allowed."""
    fields = []
    for line in head[2:].split(b"\n"):
        fields += line.split(b"#", 1)[0].split()
        if len(fields) >= 2:
            break
    if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        return None
    return int(fields[0]), int(fields[1])
