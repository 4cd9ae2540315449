"""Read an image file (DICOM, PNG, JPEG, ...) into display-space float32 arrays.

"Display space" means what a radiologist would see on a viewer: the DICOM
modality LUT and VOI window are applied, MONOCHROME1 is inverted (bright is
always high attenuation / high signal) and colour is RGB. Values are in [0, 1].
Resizing and model normalisation belong to another module, not here.

All LUT and windowing maths is pydicom's (``pydicom.pixels``); this module only
chooses which step to run and maps the result to [0, 1]. Every failure is a
``RecordError`` with one line naming the file; messages never carry DICOM
header values other than technical ones (a known transfer syntax or
photometric interpretation, sizes, frame count). Size limits are checked from
headers first (``multimodal.data.image_guard``), and only the frames a caller will
use are decoded, so a small file cannot cost gigabytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from multimodal.config import DecodeLimits
from multimodal.errors import RecordError
from multimodal.data.shown import printable
from multimodal.data.image_guard import (
    PIXEL_KEYWORDS,
    check_file_size,
    check_pixels,
    dicom_frame_count,
    looks_like_dicom,
    photometric_label,
    scrub,
    transfer_syntax_label,
)


def read_image(path, *, window="auto", frames="all", max_count=None, limits=None, min_size=None,
               name=None) -> list[np.ndarray]:
    """Return one float32 image in [0, 1] per selected frame: (H, W) or (H, W, 3).

    window (DICOM grayscale only): "auto" uses the file's VOI LUT Sequence or
    first Window Center/Width, else min-max; "none" is min-max of the
    modality-LUT output; (center, width) is that window (linear, DICOM PS3.3
    C.11.2.1.2; LINEAR_EXACT when width < 1). frames: "all", "first",
    "middle" (index n // 2) or an int index (negative counts from the end).
    max_count: how many images the caller still needs; with frames="all" only
    that many leading frames are decoded (None: all). limits: a DecodeLimits
    (default: its defaults). Non-DICOM files count as one frame and ignore `window`.
    min_size: the caller will shrink the image to this many pixels a side, so a JPEG may be decoded
    at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's draft mode), never below min_size: 4-10x less work.
    name: how messages name the file (default: the path as given; a caller that knows the image root
    passes the path relative to it, multimodal.data.shown.shown_path).
    """
    window = _check_window(window)
    if not (isinstance(frames, str) and frames in ("all", "first", "middle")) and (
        isinstance(frames, bool) or not isinstance(frames, (int, np.integer))
    ):
        raise ValueError(f"frames must be 'all', 'first', 'middle' or an int, got {frames!r}")
    if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, (int, np.integer))
                                  or max_count < 1):
        raise ValueError(f"max_count must be None or an int >= 1, got {max_count!r}")
    limits = DecodeLimits() if limits is None else limits
    name = printable(path) if name is None else name
    p = Path(path)
    if not p.exists():
        raise RecordError(f"image not found: {name}")
    if not p.is_file():
        raise RecordError(f"not an image: {name} (not a regular file)")
    try:
        size = p.stat().st_size
        check_file_size(size, name, limits)
        with p.open("rb") as f:
            head = f.read(140)
    except OSError as e:
        raise RecordError(f"cannot read {name}: {e.strerror or type(e).__name__}") from None
    has_preamble = head[128:132] == b"DICM"
    if has_preamble or p.suffix.lower() == ".dcm":
        start = 132 if has_preamble else 0
        if not looks_like_dicom(head[start:], size - start):
            raise RecordError(f"not a DICOM file: {name} (no DICOM data element at byte {start})")
        with _quiet_pydicom():
            return _read_dicom(p, name, has_preamble, window, frames, max_count, limits)
    _frame_index(frames, 1, name)
    return [_read_pil(p, name, head, limits, min_size)]


def _check_window(window):
    """Validate `window` early: a bad argument is a caller bug (ValueError), not a bad record."""
    if isinstance(window, str):
        if window in ("auto", "none"):
            return window
    else:
        try:
            center, width = (float(v) for v in window)
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(center) and math.isfinite(width) and width > 0:
                return center, width
    raise ValueError(f"window must be 'auto', 'none' or (center, width > 0), got {window!r}")


def _frame_index(frames, n, name):
    """Map `frames` to a 0-based index for pydicom (None = all frames)."""
    if frames == "all":
        return None
    if frames == "first":
        return 0
    if frames == "middle":
        return n // 2
    i = int(frames) + n if frames < 0 else int(frames)
    if not 0 <= i < n:
        raise RecordError(f"frame {frames} out of range: {name} has {n} frame(s)")
    return i


def _reason(exc, p, name, ds=None):
    """Underlying error text as one short, printable line, naming the file as `name` does (decoders
    quote the full path), with every header string scrubbed out."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.replace(os.fspath(p), name)
    if ds is not None:
        text = scrub(text, ds)
    text = printable(text)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- DICOM


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom's warnings and log lines can quote header values (names, dates): keep them out of logs."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read_dicom(p, name, has_preamble, window, frames, max_count, limits):
    """Decode with pydicom, then run the modality -> VOI -> [0, 1] pipeline per frame."""
    import pydicom
    from pydicom import pixels

    try:
        # force=True only for '.dcm' files without preamble (raw ACR-NEMA style)
        ds = pydicom.dcmread(p, force=not has_preamble)
    except Exception as e:
        raise RecordError(f"cannot read DICOM {name}: {_reason(e, p, name)}") from None
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if _has_pixel_tag(p):
            raise RecordError(f"cannot read pixel data of DICOM {name}: file truncated or malformed")
        raise RecordError(f"DICOM {name} has no pixel data")
    n = dicom_frame_count(ds, name, limits)
    _ensure_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    index = _frame_index(frames, n, name)
    wanted = [index] if index is not None else range(n if max_count is None else min(n, max_count))
    try:
        # What ds.pixel_array does internally, but it also returns the *output*
        # photometric interpretation (YBR is usually already converted to RGB by
        # pydicom or the JPEG plugin) and decodes only the frames that are used.
        decoder, options = pixels.get_decoder(ts), pixels.as_pixel_options(ds)
        if len(wanted) == n:
            arr, meta = decoder.as_array(ds, index=None, raw=False, **options)
            stack = arr if n > 1 else arr[None]
        else:
            decoded = [decoder.as_array(ds, index=i, raw=False, **options) for i in wanted]
            stack, meta = np.stack([arr for arr, _ in decoded]), decoded[-1][1]
    except Exception as e:
        raise RecordError(
            f"cannot decode DICOM {name} (transfer syntax {transfer_syntax_label(ts)}): {_reason(e, p, name, ds)}"
        ) from None
    pi = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or "MONOCHROME2")
    try:
        if stack.ndim == 3 and pi != "PALETTE COLOR":
            out = _dicom_gray(stack, ds, pi, window)
        else:
            out = _dicom_colour(stack, ds, pi)
    except Exception as e:
        raise RecordError(f"cannot convert DICOM {name} ({photometric_label(pi)}): {_reason(e, p, name, ds)}") from None
    return [np.ascontiguousarray(f, dtype=np.float32) for f in out]


def _has_pixel_tag(p):
    """Pixel Data tag in the bytes but not in the dataset: pydicom stopped early (EOF, bad element)."""
    try:
        data = p.read_bytes()
    except OSError:
        return False
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _ensure_transfer_syntax(ds):
    """Files read with force=True may lack file meta; pydicom needs a transfer syntax to decode."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit or implicit is None
            else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )


def _dicom_gray(stack, ds, pi, window):
    """(F, H, W) stored values -> modality LUT -> VOI -> [0, 1], MONOCHROME1 inverted."""
    from pydicom import pixels

    x = pixels.apply_modality_lut(stack, ds)
    out = None
    if isinstance(window, tuple):
        center, width = window
        ds.WindowCenter, ds.WindowWidth = center, width  # ds is our private copy
        ds.VOILUTFunction = "LINEAR" if width >= 1 else "LINEAR_EXACT"
        ds.PhotometricInterpretation = "MONOCHROME2"  # pydicom only windows MONOCHROME*; we invert below
        out = _windowed(x, ds)
    elif window == "auto" and pi in ("MONOCHROME1", "MONOCHROME2"):
        try:
            out = _header_voi(x, ds)
        except Exception:  # unusable header VOI (e.g. width < 1): min-max is a sane display
            out = None
    if out is None:
        out = _minmax(x)
    return 1.0 - out if pi == "MONOCHROME1" else out


def _header_voi(x, ds):
    """Apply the file's own VOI (LUT Sequence preferred, as pydicom's apply_voi_lut does)."""
    from pydicom import pixels

    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        # VOI LUT output range is 0 .. 2**bits - 1 (LUT Descriptor 3rd value, PS3.3 C.11.2.1.1)
        lut_in = np.rint(x).astype(np.int64) if x.dtype.kind == "f" else x
        return _scale(pixels.apply_voi(lut_in, ds), 0, 2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return _windowed(x, ds)
    return None


def _windowed(x, ds):
    """pydicom windowing scaled by its own output range.

    apply_windowing maps to [y_min, y_max] = the stored-value range from Bits
    Stored / Pixel Representation (0 .. 2**n - 1 under a Modality LUT
    Sequence), passed through Rescale Slope/Intercept. Rather than copy that
    rule, we push -inf/+inf through the same call to read y_min/y_max back.
    """
    from pydicom import pixels

    with np.errstate(over="ignore"):
        y_min, y_max = pixels.apply_windowing(np.array([-np.inf, np.inf]), ds)
    return _scale(pixels.apply_windowing(x, ds), y_min, y_max)


def _scale(v, lo, hi):
    """Map [lo, hi] to [0, 1] (works for lo > hi too, e.g. negative rescale slope)."""
    if hi == lo:
        return np.zeros(v.shape)
    return np.clip((np.asarray(v, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _minmax(x):
    """Per-frame (x - min) / (max - min); a constant frame becomes zeros; NaN becomes 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for i, f in enumerate(x):
        lo, hi = np.nanmin(f), np.nanmax(f)
        if hi > lo:
            out[i] = (f - lo) / (hi - lo)
    return np.nan_to_num(out, nan=0.0)


def _dicom_colour(stack, ds, pi):
    """RGB / YBR / PALETTE COLOR -> (F, H, W, 3) RGB scaled by the bit depth's max."""
    from pydicom import pixels

    if pi == "PALETTE COLOR":
        _palette_lut_to_native_order(ds)
        rgb = pixels.apply_color_lut(stack, ds)[..., :3]  # drop an alpha LUT if any
        top = np.iinfo(rgb.dtype).max  # 255 or 65535, from the LUT data's depth
    else:
        if pi in ("YBR_FULL", "YBR_FULL_422"):  # only if the decoder left it as YCbCr
            stack = pixels.convert_color_space(stack, pi, "RGB")
        elif pi != "RGB":
            raise ValueError("unsupported photometric interpretation")
        rgb = stack
        top = 2 ** int(ds.get("BitsStored") or rgb.dtype.itemsize * 8) - 1
    return np.clip(rgb.astype(np.float64) / top, 0.0, 1.0)


def _palette_lut_to_native_order(ds):
    """Work around pydicom 3.0: apply_color_lut reads plain (non-segmented) 16-bit
    palette LUT data in machine byte order even under Explicit VR Big Endian,
    which turns e.g. 0xFF00 into 0x00FF (a black image). Byte-swap it first."""
    if ds.file_meta.TransferSyntaxUID.is_little_endian:
        return
    entries = ds.RedPaletteColorLookupTableDescriptor[0] or 2**16
    for colour in ("Red", "Green", "Blue", "Alpha"):
        elem = ds.get(f"{colour}PaletteColorLookupTableData")
        if elem is not None and len(elem) == 2 * entries:
            ds[f"{colour}PaletteColorLookupTableData"].value = (
                np.frombuffer(elem, dtype=">u2").astype(np.uint16).tobytes()
            )


# --------------------------------------------------------------------------- PIL


def _read_pil(p, name, head, limits, min_size=None):
    """PNG/JPEG/...: 8-bit -> /255, 16-bit -> /65535; alpha dropped; first frame only."""
    from PIL import Image, UnidentifiedImageError

    Image.init()  # registers every plugin, so that unknown names in `formats` can be dropped
    allowed = [f for f in limits.formats if f in Image.OPEN]
    try:
        with warnings.catch_warnings():  # our own pixel limit below is the guard, not Pillow's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(p, formats=allowed)  # lazy: reads the header only
    except UnidentifiedImageError:
        raise RecordError(f"not an image: {name}{_format_refused(head, allowed)}") from None
    except Image.DecompressionBombError:
        raise RecordError(f"image too large: {name} (over Pillow's decompression-bomb limit)") from None
    except Exception as e:
        raise RecordError(f"cannot decode image {name}: {_reason(e, p, name)}") from None
    with opened:
        check_pixels(*opened.size, name, limits)
        if min_size and opened.format == "JPEG":
            with contextlib.suppress(Exception):  # a draft that fails leaves the full decode
                opened.draft(opened.mode, (min_size, min_size))
        return _pil_pixels(opened, p, name)


def _format_refused(head, allowed):
    """' (format X not allowed)' when the first bytes are a format we do not open, else ''.

    Only the plugins' prefix tests run (what Image.open itself tries first): the file is never
    handed to a plugin outside `allowed`, so e.g. PostScript never reaches Ghostscript.
    """
    from PIL import Image

    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            verdict = fmt not in allowed and accept is not None and accept(head[:16])
        except Exception:  # a prefix test that chokes on a short prefix says nothing
            continue
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "maybe, but..." warning
            return f" (format {fmt} not allowed)"
    return ""


def _pil_pixels(im, p, name):
    """The decoding half of _read_pil, apart so that nothing is decoded before the size check."""
    from PIL import ImageOps

    try:
        im = ImageOps.exif_transpose(im)  # phone photos: show them upright, as viewers do
        mode = im.mode
        if mode.startswith("I;16"):
            out = np.asarray(im).astype(np.float64) / 65535
        elif mode in ("I", "F"):
            out = np.asarray(im).astype(np.float64)
            # 'I' holding 16-bit data (some encoders) keeps the 16-bit scale;
            # a float image already in [0, 1] is kept; anything else is min-max.
            if mode == "I" and out.size and out.min() >= 0 and out.max() <= 65535:
                out /= 65535
            elif not (out.size and np.nanmin(out) >= 0 and np.nanmax(out) <= 1):
                out = _minmax(out[None])[0]
            out = np.nan_to_num(out, nan=0.0)  # only float pixels can be NaN
        elif mode in ("1", "L", "LA", "La"):
            out = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
        else:  # RGB, RGBA, P, PA, CMYK, YCbCr, ...: colour
            out = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255)
    except Exception as e:
        raise RecordError(f"cannot decode image {name}: {_reason(e, p, name)}") from None
    return np.ascontiguousarray(out, dtype=np.float32)
