"""Sizes read from encoded data before decoding it: what a decoder would allocate.

Decoders allocate what the codestream says, not what the DICOM header says: a 3 MB file whose
header reads 64x64 can hold a codestream that claims 30000x30000, and a deflated DICOM dataset
can inflate a thousandfold. These readers let the caller refuse such objects before any decoder
runs. pydicom's ``get_j2k_parameters`` reports only the precision and its JPEG parser is private,
so the few bytes are read here.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

# Start-of-frame markers of JPEG (SOF0-SOF15 less DHT, JPG and DAC) and JPEG-LS (SOF55).
_JPEG_SOF = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)} | {0xF7}
_JPEG_SOS = 0xDA
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_DICM_OFFSET = 128
_DEFLATED_TSYNTAX = b"1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 16 * 1024**2


class JpegFrameHeader(NamedTuple):
    """A JPEG codestream's SOF segment: what a decoder needs to know before it starts."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC3 lossless, 0xF7 JPEG-LS...
    precision: int  # bits per sample
    width: int
    height: int
    components: int


def jpeg_header(data: bytes) -> JpegFrameHeader | None:
    """The SOF segment of a JPEG or JPEG-LS codestream.

    Returns:
        None when the data is not a JPEG codestream or ends before its SOF segment.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            precision, height, width = struct.unpack(">BHH", data[pos + 4:pos + 9])
            components = data[pos + 9] if pos + 9 < len(data) else 0  # 0: cut off before it
            return JpegFrameHeader(marker, precision, width, height, components)
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _JPEG_SOS or length < 2:  # scan data before any frame header: not a frame
            return None
        pos += 2 + length
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG or JPEG-LS codestream's SOF segment, or None (see
    :func:`jpeg_header`)."""
    header = jpeg_header(data)
    return None if header is None else (header.width, header.height)


def jpeg_ends(data: bytes) -> bool:
    """Whether a JPEG codestream ends with its EOI marker (DICOM pads frames to an even length
    with a zero byte). A codestream cut short decodes to an error on the CPU path; some decoders
    would return the part they got instead, so only complete ones are handed to them."""
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def j2k_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG 2000 codestream's SIZ segment (raw or inside a JP2 file).

    Returns:
        None when the data is not a JPEG 2000 codestream or ends inside its SIZ segment.
    """
    offset = _jp2c_offset(data) if data.startswith(_JP2_SIGNATURE) else 0
    if offset is None or data[offset:offset + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ (A.5.1)
        return None
    fields = data[offset + 8:offset + 24]  # after the marker, Lsiz and Rsiz: Xsiz Ysiz XOsiz YOsiz
    if len(fields) < 16:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", fields)
    return xsiz - x0, ysiz - y0


def _jp2c_offset(data: bytes) -> int | None:
    """Where the codestream starts inside a JP2 file: after the header of its ``jp2c`` box."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if length == 1:  # a 64-bit length follows the type
            if pos + 16 > len(data):
                return None
            length, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        if kind == b"jp2c":
            return pos + header
        if length < header:  # 0 means "to the end of the file", and any other short length is junk
            return None
        pos += length
    return None


def deflated_dataset_size(data: bytes, limit: int) -> int | None:
    """How many bytes a Deflated Explicit VR Little Endian file's dataset inflates to.

    Inflated in chunks that are counted and dropped; counting stops past ``limit``.

    Returns:
        None when ``data`` is not a deflated DICOM file; otherwise the inflated size, or a number
        above ``limit`` as soon as it is known to exceed it.
    """
    if _DEFLATED_TSYNTAX not in data[:4096]:  # cheap: the File Meta group comes first
        return None
    found = _dataset_offset(data)
    if found is None or found[1] != _DEFLATED_TSYNTAX:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = memoryview(data)[found[0]:], 0
    while pending and not inflater.eof and total <= limit:
        total += len(inflater.decompress(pending, _INFLATE_CHUNK))
        pending = inflater.unconsumed_tail
    return total


def _dataset_offset(data: bytes) -> tuple[int, bytes] | None:
    """Where the dataset starts after the File Meta group, and the transfer syntax the group names.

    The File Meta elements are always Explicit VR Little Endian (PS3.10 7.1).
    """
    if data[_DICM_OFFSET:_DICM_OFFSET + 4] != b"DICM":
        return None
    pos, tsyntax = _DICM_OFFSET + 4, b""
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        element, vr = data[pos + 2:pos + 4], data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, header = int.from_bytes(data[pos + 8:pos + 12], "little"), 12
        else:
            length, header = int.from_bytes(data[pos + 6:pos + 8], "little"), 8
        if element == b"\x10\x00":
            tsyntax = data[pos + header:pos + header + length].rstrip(b"\0 ")
        pos += header + length
    return pos, tsyntax
