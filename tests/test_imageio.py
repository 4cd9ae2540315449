"""Tests for multimodal.data.imageio.read_image, checked against known pixel values."""

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from multimodal.errors import RecordError  # noqa: E402
from multimodal.data.imageio import read_image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DICOM_DIR = SHARED / "dicom"


def shared(name):
    """Path to a file in ../shared/data/dicom/pydicom_data, or skip when the data is absent."""
    if not DICOM_DIR.is_dir():
        pytest.skip("../shared/data/dicom not present")
    path = DICOM_DIR / "pydicom_data" / name
    if not path.is_file():
        pytest.skip(f"../shared/data/dicom/pydicom_data/{name} not present")
    return path


def bundled(name):
    return get_testdata_file(name)


def write_dicom(path, pixels, pi="MONOCHROME2", bits_stored=12, **extra):
    """A minimal Secondary Capture file with the given uint16 grayscale / uint8 colour pixels."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = pi
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.PixelRepresentation = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, output range mapped to [0, 1] (test oracle)."""
    x = np.asarray(x, dtype=np.float64)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    mid = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else np.zeros_like(x)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, mid))


def assert_one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg
    assert "\n" not in msg and "\r" not in msg
    assert len(msg) < 300 + len(str(path))
    return msg


# ----------------------------------------------------------------------- grayscale DICOM


def test_ct_small_explicit_window_matches_dicom_formula():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # raw[61, 61] = 1233 -> 209 HU; a window around it so it lands mid-ramp
    assert hu[61, 61] == 209
    center, width = 150, 400
    (img,) = read_image(path, window=(center, width))
    assert img.dtype == np.float32 and img.shape == (128, 128)
    expected_pixel = ((209 - (center - 0.5)) / (width - 1) + 0.5)  # = 0.649123...
    assert img[61, 61] == pytest.approx(expected_pixel, abs=1e-6)
    np.testing.assert_allclose(img, linear_window(hu, center, width), atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0  # the image spans beyond the window


def test_ct_small_window_none_is_min_max_of_hounsfield():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (img,) = read_image(path, window="none")
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    # CT_small has no window in its header, so "auto" is min-max too
    np.testing.assert_array_equal(read_image(path)[0], img)


def test_header_window_clips_to_exact_zero_and_one():
    path = shared("693_UNCR.dcm")  # CT, Window Center 40 / Width 100, intercept -1024
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) + float(ds.RescaleIntercept)
    (img,) = read_image(path)
    below, above = hu <= -10, hu > 89  # 40 - 0.5 -/+ 99/2
    assert below.any() and above.any()
    assert np.all(img[below] == 0.0)
    assert np.all(img[above] == 1.0)
    inside = ~below & ~above
    assert np.all((img[inside] > 0) & (img[inside] <= 1))  # hu == 89 is the top of the ramp
    np.testing.assert_allclose(img, linear_window(hu, 40, 100), atol=1e-6)


def test_header_with_several_windows_uses_the_first():
    path = shared("bad_sequence.dcm")  # Window Center [40, 450], Width [350, 1500]
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (img,) = read_image(path)
    np.testing.assert_allclose(img, linear_window(hu, 40, 350), atol=1e-6)


def test_voi_lut_sequence_is_applied_and_scaled_by_lut_depth():
    path = shared("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [256, 0, 16]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    (img,) = read_image(path)
    np.testing.assert_allclose(img, lut[ds.pixel_array] / 65535, atol=1e-6)


def test_modality_lut_sequence_then_min_max():
    path = shared("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    desc = ds.ModalityLUTSequence[0].LUTDescriptor
    lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
    out = lut[np.clip(ds.pixel_array.astype(np.int64) - desc[1], 0, len(lut) - 1)]
    (img,) = read_image(path)
    np.testing.assert_allclose(img, (out - out.min()) / (out.max() - out.min()), atol=1e-6)


@pytest.mark.parametrize("window", ["none", (2000, 4000)])
def test_monochrome1_is_inverted(tmp_path, window):
    pixels = np.array([[0, 100], [2000, 4095]], dtype=np.uint16)
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"), window=window)[0]
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"), window=window)[0]
    assert m1[0, 0] == 1.0 and m1[1, 1] == 0.0  # lowest stored value is displayed brightest
    assert m2[0, 0] == 0.0 and m2[1, 1] == 1.0
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-7)
    if window == "none":
        assert m2[0, 1] == pytest.approx(100 / 4095, abs=1e-7)


def test_explicit_window_on_unsigned_12_bit(tmp_path):
    pixels = np.array([[0, 99, 100, 150], [199, 200, 300, 4095]], dtype=np.uint16)
    (img,) = read_image(write_dicom(tmp_path / "w.dcm", pixels), window=(150, 100))
    np.testing.assert_allclose(img, linear_window(pixels, 150, 100), atol=1e-7)
    assert img[0, 0] == 0.0 and img[0, 1] == 0.0 and img[1, 2] == 1.0


def test_window_output_is_scaled_by_the_window_range_not_stretched(tmp_path):
    # all pixels inside the window: the result must not be stretched to 0..1
    pixels = np.array([[100, 150, 200]], dtype=np.uint16)
    (img,) = read_image(write_dicom(tmp_path / "in.dcm", pixels), window=(150, 401))
    np.testing.assert_allclose(img, linear_window(pixels, 150, 401), atol=1e-7)
    np.testing.assert_allclose(img, [[0.37625, 0.50125, 0.62625]], atol=1e-7)


def test_header_window_on_signed_rescaled_data(tmp_path):
    pixels = np.array([[1000, 1024, 1064, 1100]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", pixels, bits_stored=16, RescaleSlope=2,
                       RescaleIntercept=-2048, WindowCenter=40, WindowWidth=400)
    hu = pixels * 2.0 - 2048  # [-48, 0, 80, 152]
    (img,) = read_image(path)
    np.testing.assert_allclose(img, linear_window(hu, 40, 400), atol=1e-7)


def test_synthetic_voi_lut_is_scaled_by_its_bit_depth(tmp_path):
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries, first 0, 16 bit
    item.add_new(0x00283006, "US", [1000, 2000, 30000, 40000])  # LUT Data
    path = write_dicom(tmp_path / "voi.dcm", np.array([[0, 1], [2, 3]], np.uint16),
                       VOILUTSequence=[item], WindowCenter=1, WindowWidth=2)  # LUT wins
    (img,) = read_image(path)
    np.testing.assert_allclose(img, np.array([[1000, 2000], [30000, 40000]]) / 65535, atol=1e-7)
    # window="none" ignores the LUT: plain min-max of the stored values
    np.testing.assert_allclose(read_image(path, window="none")[0], [[0, 1 / 3], [2 / 3, 1]], atol=1e-7)


def test_constant_image_min_max_is_zeros(tmp_path):
    (img,) = read_image(write_dicom(tmp_path / "c.dcm", np.full((3, 4), 77, np.uint16)))
    assert img.shape == (3, 4) and np.all(img == 0.0)


def test_real_chest_xray():
    path = DICOM_DIR / "nih_cxr" / "nih_cxr_sample.dcm"
    if not path.is_file():
        pytest.skip("../shared/data/dicom/nih_cxr/nih_cxr_sample.dcm not present")
    images = read_image(path)
    assert len(images) == 1
    (img,) = images
    assert img.shape == (1024, 1024) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.1


# ----------------------------------------------------------------------- transfer syntaxes


def _skip_if_pydicom_cannot_decode(path):
    """Skip only when pydicom itself (with every installed plugin) cannot decode the file."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    try:
        ds.pixel_array
    except Exception as e:  # missing plugin / unsupported transfer syntax in this pydicom
        reason = " ".join(str(e).split())[:150]
        pytest.skip(f"pydicom {pydicom.__version__} cannot decode {Path(path).name}: {reason}")


def _assert_same_images(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_array_equal(x, y)


LOSSLESS_PAIRS = [
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("693_J2KR.dcm", "693_UNCR.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("liver_rle.dcm", "liver.dcm"),
    ("liver_deflate.dcm", "liver.dcm"),
    ("liver_j2k.dcm", "liver.dcm"),
    ("liver_nonbyte_aligned_j2k.dcm", "liver_nonbyte_aligned.dcm"),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),
    ("JLSL_RGB_ILV1.dcm", "JLSL_RGB_ILV0.dcm"),
    ("JLSL_RGB_ILV2.dcm", "JLSL_RGB_ILV0.dcm"),
]


@pytest.mark.parametrize("compressed,plain", LOSSLESS_PAIRS)
def test_lossless_compressed_equals_uncompressed(compressed, plain):
    compressed, plain = shared(compressed), shared(plain)
    _skip_if_pydicom_cannot_decode(compressed)
    _assert_same_images(read_image(compressed, window="none"), read_image(plain, window="none"))
    for x, y in zip(read_image(compressed), read_image(plain)):
        np.testing.assert_allclose(x, y, atol=1e-6)


BUNDLED_PAIRS = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"),
]


@pytest.mark.parametrize("compressed,plain", BUNDLED_PAIRS)
def test_bundled_lossless_pairs(compressed, plain):
    compressed, plain = bundled(compressed), bundled(plain)
    _skip_if_pydicom_cannot_decode(compressed)
    _assert_same_images(read_image(compressed), read_image(plain))


BIG_ENDIAN_PAIRS = [
    ("emri_small_big_endian.dcm", "emri_small.dcm"),
    ("liver_expb.dcm", "liver.dcm"),
    ("SC_rgb_expb.dcm", "SC_rgb.dcm"),
    ("SC_rgb_expb_16bit.dcm", "SC_rgb_16bit.dcm"),
    ("SC_rgb_expb_32bit_2frame.dcm", "SC_rgb_32bit_2frame.dcm"),
    ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),  # 16-bit palette LUT stored big-endian
    ("OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_2frame.dcm"),
    ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm"),  # segmented palette LUT
]


@pytest.mark.parametrize("big,little", BIG_ENDIAN_PAIRS)
def test_big_endian_equals_little_endian(big, little):
    _assert_same_images(read_image(shared(big)), read_image(shared(little)))


def test_bundled_big_endian_equals_little_endian():
    _assert_same_images(read_image(bundled("MR_small_expb.dcm")), read_image(bundled("MR_small.dcm")))


# ----------------------------------------------------------------------- frames


def test_multiframe_selection():
    path = shared("emri_small.dcm")
    n = int(pydicom.dcmread(path).NumberOfFrames)
    assert n == 10
    frames = read_image(path)
    assert len(frames) == n and all(f.shape == (64, 64) and f.dtype == np.float32 for f in frames)
    assert not np.array_equal(frames[0], frames[5])
    _assert_same_images(read_image(path, frames="first"), [frames[0]])
    _assert_same_images(read_image(path, frames="middle"), [frames[5]])
    _assert_same_images(read_image(path, frames=3), [frames[3]])
    _assert_same_images(read_image(path, frames=np.int64(7)), [frames[7]])
    _assert_same_images(read_image(path, frames=-1), [frames[9]])


@pytest.mark.parametrize("index", [10, 99, -11])
def test_multiframe_index_out_of_range(index):
    path = shared("emri_small.dcm")
    with pytest.raises(RecordError, match="out of range") as e:
        read_image(path, frames=index)
    assert_one_line_naming(e, path)


def test_single_frame_index_out_of_range():
    path = bundled("CT_small.dcm")
    assert len(read_image(path, frames=0)) == 1
    with pytest.raises(RecordError, match="out of range"):
        read_image(path, frames=1)


def test_multiframe_colour():
    frames = read_image(shared("SC_rgb_2frame.dcm"))
    assert len(frames) == 2 and all(f.shape == (100, 100, 3) for f in frames)
    assert read_image(shared("SC_rgb_2frame.dcm"), frames=1)[0].shape == (100, 100, 3)


@pytest.mark.parametrize("bad", [dict(frames="last"), dict(frames=True), dict(frames=1.5),
                                 dict(window="bright"), dict(window=(40, 0)), dict(window=(1, 2, 3))])
def test_bad_arguments_are_value_errors(bad):
    with pytest.raises(ValueError):
        read_image(bundled("CT_small.dcm"), **bad)


# ----------------------------------------------------------------------- colour DICOM


def test_rgb_known_values():
    (img,) = read_image(shared("SC_rgb.dcm"))
    assert img.shape == (100, 100, 3) and img.dtype == np.float32
    np.testing.assert_array_equal(img[0, 0], [1, 0, 0])
    np.testing.assert_allclose(img[10, 0], [1, 128 / 255, 128 / 255], atol=1e-7)
    np.testing.assert_allclose(img[70, 0], [64 / 255] * 3, atol=1e-7)
    raw = pydicom.dcmread(shared("SC_rgb.dcm")).pixel_array
    np.testing.assert_allclose(img, raw / 255, atol=1e-7)


@pytest.mark.parametrize("name", ["SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm"])
def test_rgb_high_bit_depth_scaled_by_its_max(name):
    path = shared(name)
    ds = pydicom.dcmread(path)
    (img,) = read_image(path)
    np.testing.assert_allclose(img, ds.pixel_array / (2.0 ** int(ds.BitsStored) - 1), atol=1e-7)
    np.testing.assert_allclose(img, read_image(shared("SC_rgb.dcm"))[0], atol=1e-7)


@pytest.mark.parametrize("path,max_diff,mean_diff", [
    (lambda: shared("SC_ybr_full_uncompressed.dcm"), 8, 1),
    (lambda: bundled("SC_ybr_full_422_uncompressed.dcm"), 8, 1),
    (lambda: bundled("SC_rgb_jpeg_dcmtk.dcm"), 8, 1),  # JPEG baseline, YBR_FULL
    (lambda: shared("SC_rgb_dcmtk_ebcyn2_dcmd.dcm"), 8, 1),
    (lambda: shared("SC_rgb_dcmtk_ebcys4_dcmd.dcm"), 8, 1),
    (lambda: shared("SC_rgb_dcmtk_ebcyn1_dcmd.dcm"), 255, 4),  # chroma-subsampled JPEG edges
    (lambda: shared("SC_rgb_dcmtk_ebcynp_dcmd.dcm"), 255, 4),
], ids=["ybr_full", "ybr_full_422", "jpeg_ybr", "ebcyn2", "ebcys4", "ebcyn1", "ebcynp"])
def test_ybr_and_decoded_jpeg_match_rgb(path, max_diff, mean_diff):
    (img,) = read_image(path())
    (ref,) = read_image(shared("SC_rgb.dcm"))
    assert img.shape == (100, 100, 3) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    diff = np.abs(img - ref) * 255
    assert diff.max() <= max_diff + 1e-3
    assert diff.mean() <= mean_diff


def test_synthetic_ybr_full_converted_to_rgb(tmp_path):
    ybr = np.array([[[255, 128, 128], [0, 128, 128], [76, 85, 255]]], dtype=np.uint8)
    (img,) = read_image(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert img.shape == (1, 3, 3)
    np.testing.assert_allclose(img[0, 0], [1, 1, 1], atol=1 / 255)
    np.testing.assert_allclose(img[0, 1], [0, 0, 0], atol=1 / 255)
    np.testing.assert_allclose(img[0, 2], [1, 0, 0], atol=2 / 255)  # YCbCr of pure red


def test_ybr_left_unconverted_by_the_decoder_is_still_rgb(monkeypatch):
    """If pydicom or a plugin hands back YCbCr, read_image converts it itself."""
    real = pydicom.pixels.get_decoder

    class RawDecoder:
        def __init__(self, ts):
            self.decoder = real(ts)

        def as_array(self, *args, **kwargs):
            return self.decoder.as_array(*args, **{**kwargs, "raw": True})

    monkeypatch.setattr(pydicom.pixels, "get_decoder", RawDecoder)
    (img,) = read_image(bundled("SC_ybr_full_422_uncompressed.dcm"))
    monkeypatch.undo()
    (ref,) = read_image(shared("SC_rgb.dcm"))
    assert np.abs(img - ref).max() * 255 <= 8 + 1e-3


def test_palette_colour_uses_the_lut():
    path = shared("OT-PAL-8-face.dcm")
    ds = pydicom.dcmread(path, force=True)  # no preamble, no file meta: implicit VR little endian
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [200, 0, 16]
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2")
            for c in ("Red", "Green", "Blue")]
    raw = ds.pixel_array
    expected = np.stack([lut[np.clip(raw, 0, 199)] for lut in luts], axis=-1) / 65535
    (img,) = read_image(path)
    assert img.shape == (480, 640, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, expected, atol=1e-7)
    assert img.std() > 0.1


def test_dicom_is_detected_by_content_not_extension(tmp_path):
    path = write_dicom(tmp_path / "scan.png", np.array([[0, 4095]], np.uint16))
    (img,) = read_image(path)
    np.testing.assert_array_equal(img, [[0.0, 1.0]])


# ----------------------------------------------------------------------- PIL formats


def test_png_8_bit_gray(tmp_path):
    path = tmp_path / "g8.png"
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(path)
    (img,) = read_image(str(path))
    assert img.shape == (1, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, [[0, 128 / 255, 1]], atol=1e-7)


def test_png_16_bit_gray(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 40000, 65535]], np.uint16)).save(path)
    (img,) = read_image(path)
    np.testing.assert_allclose(img, [[0, 40000 / 65535, 1]], atol=1e-7)


def test_png_gray_alpha_and_rgba_drop_alpha(tmp_path):
    la = Image.fromarray(np.array([[[10, 0], [200, 255]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png")[0], [[10 / 255, 200 / 255]], atol=1e-7)
    rgba = np.array([[[255, 0, 0, 0], [0, 128, 255, 255]]], np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    (img,) = read_image(tmp_path / "rgba.png")
    assert img.shape == (1, 2, 3)
    np.testing.assert_allclose(img, rgba[..., :3] / 255, atol=1e-7)


def test_palette_and_cmyk_images_become_rgb(tmp_path):
    p = Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").convert("P")
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], [[[1, 0, 0], [0, 0, 1]]])
    Image.new("CMYK", (2, 1), (0, 0, 0, 0)).save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif")[0], np.ones((1, 2, 3)))


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.25, 0.5]], np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif")[0], [[0.25, 0.5]])
    Image.fromarray(np.array([[-100.0, 0.0, 300.0]], np.float32)).save(tmp_path / "g.tif")
    np.testing.assert_allclose(read_image(tmp_path / "g.tif")[0], [[0, 0.25, 1]])


def test_jpeg_rgb(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 6), (200, 30, 90)).save(path, quality=95)
    images = read_image(path)
    assert len(images) == 1
    (img,) = images
    assert img.shape == (6, 8, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img.mean(axis=(0, 1)), np.array([200, 30, 90]) / 255, atol=3 / 255)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (8, 2), (255, 255, 255)).save(path, exif=exif)
    assert read_image(path)[0].shape == (8, 2, 3)


def test_animated_gif_reads_first_frame(tmp_path):
    from multimodal.config import DecodeLimits

    path = tmp_path / "anim.gif"
    frames = [Image.new("L", (2, 2), v) for v in (255, 0)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    images = read_image(path, limits=DecodeLimits(formats=["PNG", "GIF"]))  # GIF is not allowed by default
    assert len(images) == 1
    assert images[0].shape == (2, 2, 3) or images[0].shape == (2, 2)
    assert np.all(images[0] == 1.0)


# ----------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "scans" / "p1.dcm"
    with pytest.raises(RecordError, match="image not found") as e:
        read_image(str(path))
    assert_one_line_naming(e, path)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(RecordError, match="not an image") as e:
        read_image(tmp_path)
    assert_one_line_naming(e, tmp_path)


@pytest.mark.parametrize("name", ["notes.txt", "fake.png", "empty.jpg"])
def test_text_file_is_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("" if name.startswith("empty") else "patient feels fine\nsecond line\n")
    with pytest.raises(RecordError, match="not an image") as e:
        read_image(path)
    assert_one_line_naming(e, path)


def test_truncated_png(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(RecordError) as e:
        read_image(bad)
    assert_one_line_naming(e, bad)


def test_shared_truncated_jpeg2000_dicom():
    path = shared("emri_small_jpeg_2k_lossless_too_short.dcm")
    with pytest.raises(RecordError, match="truncated") as e:  # pydicom's EOF warning is kept out of logs
        read_image(path)
    assert_one_line_naming(e, path)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_self_truncated_dicom(tmp_path, keep):
    data = Path(bundled("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RecordError) as e:
        read_image(path)
    assert_one_line_naming(e, path)


def test_bundled_truncated_pixel_data():
    path = bundled("MR_truncated.dcm")
    with pytest.raises(RecordError, match="cannot decode DICOM .*transfer syntax") as e:
        read_image(path)
    assert_one_line_naming(e, path)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(RecordError, match="has no pixel data") as e:
        read_image(path)
    assert_one_line_naming(e, path)


def test_unsupported_transfer_syntax_message_names_it(tmp_path):
    path = write_dicom(tmp_path / "ls.dcm", np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder anywhere
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 8])
    ds.save_as(path)
    with pytest.raises(RecordError, match=r"cannot decode DICOM .*\(transfer syntax MPEG2") as e:
        read_image(path)
    assert_one_line_naming(e, path)


PHI = ("Doe^Jane", "Doe", "Jane", "MRN123456", "19700101")


def _phi_dicom(tmp_path):
    return write_dicom(tmp_path / "phi.dcm", np.zeros((4, 4), np.uint16),
                       PatientName="Doe^Jane", PatientID="MRN123456", PatientBirthDate="19700101")


def test_error_message_has_no_header_values(tmp_path):
    path = _phi_dicom(tmp_path)
    ds = pydicom.dcmread(path)
    ds.PixelData = b"\x00\x01\x02"  # too short for 4x4x16 bit
    ds.save_as(path)
    with pytest.raises(RecordError) as e:
        read_image(path)
    msg = assert_one_line_naming(e, path)
    assert not any(s in msg for s in PHI)


def test_header_values_in_decoder_errors_are_scrubbed(tmp_path, monkeypatch):
    path = _phi_dicom(tmp_path)

    class LeakyDecoder:
        def as_array(self, *args, **kwargs):
            raise ValueError("bad frame for Doe^Jane (MRN123456),\nborn 19700101")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: LeakyDecoder())
    with pytest.raises(RecordError, match="bad frame") as e:
        read_image(path)
    msg = assert_one_line_naming(e, path)
    assert not any(s in msg for s in PHI)


def test_long_underlying_errors_are_truncated(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((2, 2), np.uint16))

    class NoisyDecoder:
        def as_array(self, *args, **kwargs):
            raise RuntimeError("line\n" * 500)

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: NoisyDecoder())
    with pytest.raises(RecordError) as e:
        read_image(path)
    assert len(assert_one_line_naming(e, path)) < 400


def test_reading_broken_dicom_emits_no_warnings_or_logs(tmp_path, caplog):
    """pydicom warns and logs while reading broken files, and such lines may quote header values;
    reading must keep every one of them out of the user's logs."""
    import logging
    import warnings

    import pydicom

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PatientName = "Doe^Jane"
    full = tmp_path / "full.dcm"
    ds.save_as(full)
    path = tmp_path / "cut.dcm"
    path.write_bytes(full.read_bytes()[:-300])  # EOF inside encapsulated Pixel Data: pydicom warns
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RecordError) as e:
            read_image(path)
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert "Doe" not in str(e.value)


def test_jpeg_draft_decodes_small_but_never_below_min_size(tmp_path):
    """A 1600x1200 photo needed at 128 px is decoded at 1/8 scale (200x150), and once both are
    shrunk to 128 px the pixels agree with the full decode within a few 1/255."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    yy, xx = np.mgrid[0:1200, 0:1600]
    rgb = np.stack([xx / 1600 * 255, yy / 1200 * 255, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    full = read_image(tmp_path / "big.jpg")[0]
    small = read_image(tmp_path / "big.jpg", min_size=128)[0]
    assert full.shape == (1200, 1600, 3) and small.shape == (150, 200, 3)
    assert read_image(tmp_path / "big.jpg", min_size=400)[0].shape == (600, 800, 3)

    def shrink(a):
        return F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], size=(128, 128), mode="bilinear",
                             antialias=True)[0]

    diff = (shrink(full) - shrink(small)).abs()
    assert float(diff[:2].mean()) < 2 / 255 and float(diff[:2].max()) < 12 / 255  # smooth channels
    Image.fromarray(rgb).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", min_size=128)[0].shape == (1200, 1600, 3)  # PNG: no draft
