"""Checks that run before an image file is decoded, and what error messages may show of a DICOM header.

A small file can declare a huge image (a 140 KB PNG of 12000 x 12000 pixels, a 1 MB DICOM of
20,000 frames) or be garbage that pydicom parses for minutes (64 MB of zeros read with force=True).
Everything here looks only at the file size, the first bytes or the parsed header, so the cost of
refusing such a file does not depend on what it claims to hold.

Exception text from pydicom and its plugins may quote header values (a name in a bogus Photometric
Interpretation, a UID), so it is scrubbed of every string in the header before anyone sees it.
"""

from __future__ import annotations

import re
import struct

from multimodal.errors import RecordError

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # the same three, as tags: never converted to scrub
WITHHELD = "details withheld (the header could not be scrubbed)"
# Separators inside one header value (PN components and groups, multi-values, words): each piece
# can identify someone on its own, so each is scrubbed as well as the whole value.
_SPLIT = re.compile(r"[\^=\\\s]+")
# A header with more distinct strings than this is not scrubbed piece by piece: its details are withheld.
_MAX_SECRETS = 20_000
# Raw bytes are only read as text up to this size: larger binary values are pixels, LUTs, blobs.
_MAX_BYTES = 65_536
_MB = 2**20


def check_file_size(size: int, name: str, limits) -> None:
    """Refuse before any byte is read: every later step (pydicom reads the whole file) scales with it."""
    if size > limits.max_file_mb * _MB:
        raise RecordError(f"image file too large: {name} is {size:,} bytes (limit {limits.max_file_mb:g} MB)")


def check_pixels(width, height, name: str, limits) -> None:
    """One frame's rows x columns against max_pixels, whatever the format: decoded memory scales with it."""
    if width * height > limits.max_pixels:
        raise RecordError(f"image too large: {name} is {width} x {height} pixels (limit {limits.max_pixels})")


def dicom_frame_count(ds, name: str, limits) -> int:
    """Frames declared by the header, after refusing frame sizes and counts over the limits."""
    rows, cols = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    if rows and cols:
        check_pixels(cols, rows, name, limits)
    n = max(_header_int(ds, "NumberOfFrames") or 1, 1)
    if n > limits.max_frames:
        raise RecordError(f"too many frames: {name} declares {n} (limit {limits.max_frames})")
    return n


def _header_int(ds, keyword):
    """An integer header value, or None when absent or unparsable (the decoder will then complain)."""
    try:
        return int(ds.get(keyword))
    except Exception:  # also a raw element pydicom cannot convert at all
        return None


def looks_like_dicom(data: bytes, size: int) -> bool:
    """Whether `data` (the bytes where a dataset starts) can begin a DICOM dataset.

    pydicom with force=True parses anything, and spends seconds per MB on runs of tiny elements
    (64 MB of zeros: 41 s). A real dataset starts with a non-zero, even (standard) group, whose
    value is either explicit-VR or has a length that fits in the file.
    """
    from pydicom.valuerep import VR

    if len(data) < 8:
        return False
    vrs = {v.value.encode() for v in VR}
    for order in "<>":
        (group,) = struct.unpack(order + "H", data[:2])
        if group % 2 or not 0x0002 <= group <= 0x7FE0:
            continue
        if data[4:6] in vrs:  # explicit VR
            return True
        (length,) = struct.unpack(order + "I", data[4:8])
        if length == 0xFFFFFFFF or length <= size - 8:
            return True
    return False


# --------------------------------------------------------------------------- messages


def transfer_syntax_label(ts) -> str:
    """Name of a known transfer syntax; anything else is header text and stays out of messages."""
    from pydicom.uid import AllTransferSyntaxes

    return ts.name if ts in AllTransferSyntaxes else "unknown transfer syntax"


def photometric_label(pi) -> str:
    """A DICOM-defined photometric interpretation as is; anything else is header text."""
    from pydicom.pixels.common import PhotometricInterpretation

    known = {m.value for m in PhotometricInterpretation}
    return pi if pi in known else "unrecognised photometric interpretation"


def scrub(text: str, ds) -> str:
    """`text` with every string found in the header `ds` replaced, whatever its case."""
    secrets = header_strings(ds)
    if secrets is None:
        return WITHHELD
    low = text.lower()
    for s in secrets:  # longest first: a whole value goes before its pieces
        if s.lower() in low:
            # alphanumeric boundaries, so a short piece ("Li") does not eat into ordinary words
            text = re.sub(rf"(?<![^\W_]){re.escape(s)}(?![^\W_])", "<redacted>", text, flags=re.IGNORECASE)
            low = text.lower()
    return text


def header_strings(ds):
    """Every string (and every piece of one) in the header, longest first; None if the header
    cannot be walked completely, as then no one can tell what the text might quote."""
    found = set()
    try:
        for value in _string_values(ds):
            for x in (value, *_SPLIT.split(value)):
                x = x.strip(" \x00")
                if len(x) >= 3 or (len(x) == 2 and x.isalpha()):  # a 2-letter surname, not "12"
                    found.add(x)
            if len(found) > _MAX_SECRETS:
                return None
    except Exception:
        return None
    return sorted(found, key=len, reverse=True)


def _string_values(ds):
    """Text of every element of `ds`, its file meta and its sequences, any VR.

    An element whose value pydicom cannot convert still counts, as its raw bytes read as text.
    """
    from pydicom.multival import MultiValue
    from pydicom.valuerep import STR_VR, PersonName

    for dataset in (getattr(ds, "file_meta", None), ds):
        if dataset is None:
            continue
        for tag in list(dataset.keys()):
            if tag in _PIXEL_TAGS:
                continue
            converted = True
            try:
                elem = dataset[tag]
                value = elem.value
            except Exception:
                converted = False
                elem = dataset.get_item(tag)
                value = elem.value
            if elem.VR == "SQ" and converted:
                for item in value or ():
                    yield from _string_values(item)
                continue
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple, MultiValue)) else (value,):
                if isinstance(v, (bytes, bytearray)):
                    if len(v) <= _MAX_BYTES:
                        yield bytes(v).decode("latin-1")
                    elif not converted or elem.VR in STR_VR:  # text we cannot afford to scrub
                        raise ValueError("header value too large to scrub")
                elif isinstance(v, (str, PersonName)) or elem.VR in STR_VR:
                    yield str(v)
