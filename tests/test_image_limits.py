"""Hostile or broken image files: limits checked before decoding, only needed frames decoded,
format whitelist, header scrubbing in messages, and confinement of image paths to the image root."""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

from pydicom.data import get_testdata_file  # noqa: E402
from test_imageio import write_dicom  # noqa: E402

from multimodal.config import DecodeLimits, ImageConfig  # noqa: E402
from multimodal.errors import RecordError  # noqa: E402
from multimodal.data.image_guard import looks_like_dicom  # noqa: E402
from multimodal.data.imageio import read_image  # noqa: E402
from multimodal.data.preprocess.image import ImagePreprocessor  # noqa: E402


def multiframe_dicom(path, n, size=8):
    """n frames of size (>= 3) x size: corners 0 and 4095 (so min-max is fixed), pixel [1, 1] = frame + 1."""
    stack = np.zeros((n, size, size), np.uint16)
    stack[:, -1, -1] = 4095
    stack[:, 1, 1] = np.arange(1, n + 1)
    write_dicom(path, stack[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = n
    ds.PixelData = stack.astype("<u2").tobytes()
    ds.save_as(path)
    return path


@pytest.fixture
def decoded_frames(monkeypatch):
    """Spy on pydicom's decoder: the list of frame counts each call decoded."""
    real = pydicom.pixels.get_decoder
    calls = []

    class Spy:
        def __init__(self, ts):
            self.decoder = real(ts)

        def as_array(self, ds, *, index=None, **kwargs):
            calls.append(int(ds.get("NumberOfFrames") or 1) if index is None else 1)
            return self.decoder.as_array(ds, index=index, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "get_decoder", Spy)
    return calls


def forbid(monkeypatch, owner, attr):
    """Make owner.attr fail the test if called: the step must never be reached."""
    def boom(*args, **kwargs):
        pytest.fail(f"{attr} was called")

    monkeypatch.setattr(owner, attr, boom)


def png_header(width, height):
    """A tiny PNG that declares width x height 8-bit gray pixels (its data is a few zero rows)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def image_config(**kw):
    return ImageConfig(augment=None, **kw)


# ----------------------------------------------------------------------- 1. only used frames decoded


def test_all_frames_with_max_count_decodes_only_those(tmp_path, decoded_frames):
    path = multiframe_dicom(tmp_path / "many.dcm", 2000)
    images = read_image(path, window="none", max_count=2)
    assert len(images) == 2
    assert sum(decoded_frames) <= 2
    for k, img in enumerate(images):
        assert img.shape == (8, 8)
        assert img[1, 1] == pytest.approx((k + 1) / 4095, abs=1e-7)
        assert img[0, 0] == 0.0 and img[-1, -1] == 1.0


def test_max_count_beyond_the_frame_count_reads_all(tmp_path):
    path = multiframe_dicom(tmp_path / "three.dcm", 3)
    images = read_image(path, window="none", max_count=10)
    assert [round(float(i[1, 1]) * 4095) for i in images] == [1, 2, 3]
    assert len(read_image(path, frames=-1, max_count=1)) == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_max_count_is_a_value_error(tmp_path, bad):
    with pytest.raises(ValueError, match="max_count"):
        read_image(multiframe_dicom(tmp_path / "x.dcm", 2), max_count=bad)


def test_preprocessor_decodes_only_the_frames_it_keeps(tmp_path, decoded_frames):
    write_dicom(tmp_path / "one.dcm", np.full((16, 16), 7, np.uint16))
    multiframe_dicom(tmp_path / "many.dcm", 2000, size=16)
    prep = ImagePreprocessor(image_config(size=16, max_images=3, window="none"), [0.5], [0.5])
    x = prep.load(["one.dcm;many.dcm"], tmp_path)
    assert x.shape == (3, 1, 16, 16)
    assert sum(decoded_frames) <= 3  # 1 + 2, never the 2000
    assert float(x[1, 0, 1, 1]) == pytest.approx(1 / 4095, abs=1e-6)
    assert float(x[2, 0, 1, 1]) == pytest.approx(2 / 4095, abs=1e-6)


def _views_dataset(tmp_path, train_views, train=True, n_files=5, max_images=2, predict_views="first", **image):
    """Record 0 lists n_files grey PNGs; pixel value 10 (k + 1) / 255 names file k."""
    import pandas as pd

    from multimodal.config import Config
    from multimodal.data.batches import RecordDataset
    from multimodal.data.preprocess import Preprocessing
    from multimodal.data.records import Records

    for k in range(n_files):
        Image.fromarray(np.full((16, 16), 10 * (k + 1), np.uint8)).save(tmp_path / f"v{k}.png")
    df = pd.DataFrame({"patient_id": ["p", "q"], "label": [1, 0],
                       "image_path": [";".join(f"v{k}.png" for k in range(n_files)), "v0.png"]})
    cfg = Config.model_validate({"task": {"label": "label"}, "modalities": ["image"],
                                 "image": {"size": 16, "max_images": max_images, "augment": None,
                                           "train_views": train_views, "predict_views": predict_views,
                                           "mean": [0.0], "std": [1.0], **image}})
    recs = Records(df, tmp_path)
    return RecordDataset(recs, Preprocessing.fit(cfg, recs), cfg.modalities, cfg, train=train, cache=True)


def _files_read(item) -> list[int]:
    return [round(float(v[0, 0, 0]) * 255 / 10) - 1 for v in item["image"]]


def test_random_train_views_draw_every_listed_image_in_order(tmp_path):
    import random

    ds = _views_dataset(tmp_path, "random")
    random.seed(0)
    draws = [_files_read(ds[0]) for _ in range(40)]
    assert all(len(d) == 2 and d == sorted(d) and len(set(d)) == 2 for d in draws)
    assert {k for d in draws for k in d} == set(range(5))  # every photograph is seen
    assert len({tuple(d) for d in draws}) > 5
    assert len(ds.cache) == 5  # each file decoded once, then reused from memory
    (tmp_path / "first").mkdir()
    first = _views_dataset(tmp_path / "first", "first")
    assert [_files_read(first[0]) for _ in range(5)] == [[0, 1]] * 5  # the default: as before


def test_validation_and_first_views_read_the_first_images(tmp_path):
    val = _views_dataset(tmp_path, "random", train=False)
    assert [_files_read(val[0]) for _ in range(5)] == [[0, 1]] * 5
    few = _views_dataset(tmp_path, "random", n_files=2, max_images=3)  # nothing to draw from
    assert _files_read(few[0]) == [0, 1]


def test_random_train_views_refuse_cached_features():
    with pytest.raises(ValueError, match="train_views: random needs images read each epoch"):
        ImageConfig(train_views="random", freeze="all", cache_features=True)


# ----------------------------------------------------------------------- 2. limits from the header


def test_dicom_frame_larger_than_max_pixels_is_refused_before_decoding(tmp_path, decoded_frames):
    path = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint16))
    with pytest.raises(RecordError, match=r"image too large: .*8 x 8 pixels \(limit 63\)"):
        read_image(path, limits=DecodeLimits(max_pixels=63))
    assert decoded_frames == []
    assert read_image(path, limits=DecodeLimits(max_pixels=64))[0].shape == (8, 8)


def test_dicom_declaring_too_many_frames_is_refused_before_decoding(tmp_path, decoded_frames):
    path = multiframe_dicom(tmp_path / "frames.dcm", 20_000, size=3)  # 360 KB of pixel data
    with pytest.raises(RecordError, match=r"too many frames: .* declares 20000 \(limit 10000\)") as e:
        read_image(path)
    assert "\n" not in str(e.value)
    assert decoded_frames == []
    assert len(read_image(path, limits=DecodeLimits(max_frames=20_000), max_count=1)) == 1


@pytest.mark.parametrize("name", ["scan.dcm", "photo.png"])
def test_file_over_max_file_mb_is_refused_before_reading(tmp_path, monkeypatch, name):
    path = tmp_path / name
    if name.endswith(".dcm"):
        write_dicom(path, np.zeros((32, 32), np.uint16))
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)).save(path)
    assert path.stat().st_size > 1024
    forbid(monkeypatch, pydicom, "dcmread")
    forbid(monkeypatch, Image, "open")
    with pytest.raises(RecordError, match=r"image file too large: .* is [0-9,]+ bytes \(limit 0.001 MB\)"):
        read_image(path, limits=DecodeLimits(max_file_mb=0.001))


def test_png_declaring_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(12000, 12000))  # 144 Mpx: over Pillow's warning, under its error
    forbid(monkeypatch, ImageFile.ImageFile, "load")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RecordError, match=r"image too large: .*12000 x 12000 pixels \(limit 40000000\)"):
            read_image(path)
    assert not caught, [str(w.message) for w in caught]


def test_png_over_pillows_own_limit_gets_our_message(tmp_path):
    path = tmp_path / "bigger.png"
    path.write_bytes(png_header(20000, 20000))  # Pillow raises DecompressionBombError in open()
    with pytest.raises(RecordError, match=r"image too large: "):
        read_image(path, limits=DecodeLimits(max_pixels=10**9))


def test_pillow_pixel_limit_is_ours(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(path)
    with pytest.raises(RecordError, match=r"30 x 30 pixels \(limit 899\)"):
        read_image(path, limits=DecodeLimits(max_pixels=899))
    assert np.all(read_image(path, limits=DecodeLimits(max_pixels=900))[0] == 1.0)


# ----------------------------------------------------------------------- 3. sniffing preamble-less files


@pytest.mark.parametrize("preamble", [b"", b"\0" * 128 + b"DICM"])
def test_zero_filled_dcm_is_refused_without_parsing(tmp_path, monkeypatch, preamble):
    path = tmp_path / "zeros.dcm"
    path.write_bytes(preamble + b"\0" * (4 << 20))
    forbid(monkeypatch, pydicom, "dcmread")
    with pytest.raises(RecordError, match="not a DICOM file"):
        read_image(path)


def test_text_named_dcm_is_not_a_dicom_file(tmp_path, monkeypatch):
    path = tmp_path / "notes.dcm"
    path.write_text("patient feels fine\n" * 100)
    forbid(monkeypatch, pydicom, "dcmread")
    with pytest.raises(RecordError, match="not a DICOM file"):
        read_image(path)


def test_real_preamble_less_dicom_files_pass_the_sniff():
    for name in ("ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "rtstruct.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        assert looks_like_dicom(data[:8], len(data)), name
    assert not looks_like_dicom(b"\0" * 8, 1000)
    assert not looks_like_dicom(b"\x08\x00\x05\x00", 1000)  # too short for one element
    assert not looks_like_dicom(b"\x08\x00\x05\x00\xff\xff\xff\x7f", 1000)  # implicit length past EOF
    assert looks_like_dicom(b"\x08\x00\x05\x00\x0a\x00\x00\x00", 1000)  # implicit VR, length 10


def test_preamble_less_dicom_still_reads(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", np.array([[0, 4095]], np.uint16)))
    ds.file_meta = pydicom.dataset.FileMetaDataset()  # keep only the dataset, as ACR-NEMA style files are
    ds.preamble = None
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(read_image(raw)[0], [[0.0, 1.0]])


# ----------------------------------------------------------------------- 4. format whitelist


def test_postscript_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    path = tmp_path / "scan.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n")
    forbid(monkeypatch, EpsImagePlugin, "Ghostscript")
    forbid(monkeypatch, EpsImagePlugin.EpsImageFile, "_open")
    with pytest.raises(RecordError, match=r"not an image: .*scan.png \(format EPS not allowed\)"):
        read_image(path)


def test_gif_named_png_only_with_gif_allowed(tmp_path):
    path = tmp_path / "really_a_gif.png"
    Image.new("L", (3, 2), 255).save(path, format="GIF")
    with pytest.raises(RecordError, match=r"not an image: .* \(format GIF not allowed\)"):
        read_image(path)
    (img,) = read_image(path, limits=DecodeLimits(formats=["png", "gif"]))
    assert img.shape[:2] == (2, 3) and np.all(img == 1.0)


def test_unknown_format_names_are_ignored(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)
    assert read_image(path, limits=DecodeLimits(formats=["JPG", "PNG"]))[0].shape == (2, 2)
    with pytest.raises(RecordError, match=r"not an image: .*\(format PNG not allowed\)"):
        read_image(path, limits=DecodeLimits(formats=["JPG"]))


# ----------------------------------------------------------------------- 5. header scrubbing


PHI = ("doe", "jane", "12345")


def _message_without_path(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg.replace(str(path), "").lower()


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # pydicom, while the test writes the file
def test_bogus_photometric_interpretation_is_scrubbed(tmp_path):
    path = write_dicom(tmp_path / "pi.dcm", np.zeros((4, 4), np.uint16), "DOE^JANE 12345",
                       PatientName="Doe^Jane")
    with pytest.raises(RecordError) as e:
        read_image(path)
    msg = _message_without_path(e, path)
    assert not any(s in msg for s in PHI), msg


def test_our_own_labels_print_only_known_values(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "rgb.dcm", np.zeros((2, 2, 3), np.uint8), "RGB", PatientName="Doe^Jane")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.12345"  # not a known transfer syntax
    ds.save_as(path)

    class Decoder:
        def as_array(self, *args, **kwargs):
            return np.zeros((2, 2, 3), np.uint8), {"photometric_interpretation": "doe^jane 12345"}

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Decoder())
    with pytest.raises(RecordError, match="unrecognised photometric interpretation") as e:
        read_image(path)
    assert not any(s in _message_without_path(e, path) for s in PHI)

    class Failing:
        def as_array(self, *args, **kwargs):
            raise ValueError("cannot decode 1.2.826.0.1.3680043.12345 for DOE^jane: it does not fit")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Failing())
    with pytest.raises(RecordError, match=r"\(transfer syntax unknown transfer syntax\)") as e:
        read_image(path)
    msg = _message_without_path(e, path)
    assert msg.endswith("cannot decode <redacted> for <redacted>: it does not fit")  # "does" keeps its "doe"


def test_values_of_every_vr_and_raw_bytes_are_scrubbed(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((2, 2), np.uint16), AccessionNumber="ACC778899")
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "UN", b"SMITH^JOHN")  # a private value pydicom cannot interpret
    ds.ImageComments = "seen by dr Whoever"
    ds.save_as(path)

    class Leaky:
        def as_array(self, *args, **kwargs):
            raise ValueError("values: acc778899 smith JOHN whoever")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Leaky())
    with pytest.raises(RecordError) as e:
        read_image(path)
    msg = _message_without_path(e, path)
    for secret in ("acc778899", "smith", "john", "whoever"):
        assert secret not in msg, msg
    assert msg.count("<redacted>") == 4


# ----------------------------------------------------------------------- 6. confinement to the image root


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "sub" / "in.png")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(outside / "out.png")
    (root / "link_out.png").symlink_to(outside / "out.png")
    (root / "link_in.png").symlink_to(root / "sub" / "in.png")
    return root, outside


def _prep(confine):
    return ImagePreprocessor(image_config(size=16), [0.5], [0.5], confine=confine)


@pytest.mark.parametrize("cell", ["ABS", "../outside/out.png", "link_out.png", "sub/../../outside/out.png"])
def test_confined_paths_outside_the_root_are_refused(tree, cell):
    root, outside = tree
    cell = str(outside / "out.png") if cell == "ABS" else cell
    with pytest.raises(RecordError, match="image path outside the image root") as e:
        _prep(True).load([cell], root)
    # named as the cell writes it, relative to the root; an absolute path is not named (it may carry a name)
    shown = ".../out.png" if cell.startswith("/") else cell
    assert str(e.value) == f"image path outside the image root: {shown}"


@pytest.mark.parametrize("cell", ["sub/in.png", "sub/../sub/in.png", "link_in.png"])
def test_confined_paths_inside_the_root_load(tree, cell):
    root, _ = tree
    x = _prep(True).load([cell], root)
    assert x.shape == (1, 1, 16, 16) and float(x.min()) == 1.0


def test_unconfined_is_todays_behaviour(tree):
    root, outside = tree
    x = _prep(False).load([f"../outside/out.png;{outside / 'out.png'};link_out.png"], root)
    assert x.shape == (3, 1, 16, 16)
    assert np.allclose(x.numpy(), 128 / 255, atol=1e-6)
    assert _prep(True).load([None], root).shape == (0, 1, 16, 16)


def test_images_are_confined_unless_the_config_opts_out(tree, cohort):
    from multimodal.config import load_config
    from multimodal.data.preprocess import Preprocessing
    from multimodal.data.records import load_records
    from multimodal.synth import config_path

    root, outside = tree
    default = ImagePreprocessor(image_config(size=16), [0.5], [0.5])  # every reader that builds its own
    for cell in ("../outside/out.png", str(outside / "out.png")):
        with pytest.raises(RecordError, match="outside the image root"):
            default.load([cell], root)
    assert default.load([str(root / "sub" / "in.png")], root).shape == (1, 1, 16, 16)  # absolute, inside
    for confine in (True, False):
        over = {} if confine else {"data.confine_images": False}
        cfg = load_config(config_path(), over)
        prep = Preprocessing.fit(cfg, load_records(cohort["train"], cfg, labels=True)).image
        assert prep.confine is confine
        x = _load_or_error(prep, "../outside/out.png", root)
        assert (x == "outside") if confine else x.shape == (1, cfg.image.in_chans, cfg.image.size, cfg.image.size)


def _load_or_error(prep, cell, root):
    try:
        return prep.load([cell], root)
    except RecordError as e:
        return "outside" if "outside the image root" in str(e) else str(e)


def _series(folder, n=3):
    from test_series import _slice

    folder.mkdir(parents=True)
    for k in range(n):
        _slice(folder / f"IM{k}.dcm", k * 5.0, k + 1, value=10 * k)
    return folder


def test_a_symlinked_slice_pointing_outside_refuses_the_series(tree, monkeypatch):
    import multimodal.data.series as series

    root, outside = tree
    folder = _series(root / "ct")
    _series(outside / "elsewhere", 1)
    (folder / "IM9.dcm").symlink_to(outside / "elsewhere" / "IM0.dcm")
    read = []
    real = series._header
    monkeypatch.setattr(series, "_header", lambda p: read.append(p) or real(p))
    with pytest.raises(RecordError) as e:
        _prep(True).load(["ct"], root)
    assert str(e.value) == "series folder ct: slice IM9.dcm lies outside the image root"
    assert read == []  # refused before any header was read
    (folder / "IM9.dcm").unlink()
    (folder / "IM8.dcm").symlink_to(folder / "IM0.dcm")  # a link that stays inside is a slice
    assert _prep(True).load(["ct"], root).shape == (4, 1, 16, 16)
    (folder / "IM9.dcm").symlink_to(outside / "elsewhere" / "IM0.dcm")
    assert _prep(False).load(["ct"], root).shape == (4, 1, 16, 16)  # opted out: read as before


def test_messages_name_images_relative_to_the_root_not_by_full_path(tmp_path):
    root = tmp_path / "Doe_Jane_1961" / "images"  # a folder above the root that names the patient
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _series(root / "ct")
    (root / "ct" / "IM1.dcm").write_bytes((root / "ct" / "IM1.dcm").read_bytes()[:-100])  # pixels cut
    cases = {"sub/missing.png": "image not found: sub/missing.png",
             "sub/broken.png": "sub/broken.png",
             str(root / "sub" / "broken.png"): "sub/broken.png",
             "ct": "ct/IM1.dcm"}
    for confine in (True, False):
        for cell, needle in cases.items():
            with pytest.raises(RecordError) as e:
                _prep(confine).load([cell], root)
            assert needle in str(e.value) and "Doe_Jane" not in str(e.value) and str(tmp_path) not in str(e.value)
    with pytest.raises(RecordError) as e:
        _prep(False).load([str(tmp_path / "Doe_Jane_1961" / "gone.png")], root)
    assert str(e.value) == "image not found: .../gone.png"


ESC = "\x1b[31mred\x07\x1b[2J"  # no ';': a cell splits there


def test_control_sequences_from_files_are_escaped_in_messages(tmp_path, monkeypatch):
    from multimodal.data.batches import one_line

    (tmp_path / f"x{ESC}.png").write_bytes(b"not an image")
    with pytest.raises(RecordError) as e:
        _prep(True).load([f"x{ESC}.png"], tmp_path)
    _assert_escaped(str(e.value))
    assert "x\\x1b[31mred\\x07\\x1b[2J.png" in str(e.value)
    folder = _series(tmp_path / "root" / f"ct{ESC}")
    (folder / f"IM{ESC}.dcm").symlink_to(tmp_path / f"x{ESC}.png")
    with pytest.raises(RecordError, match="lies outside") as e:  # a slice's name and the folder's
        _prep(True).load([folder.name], folder.parent)
    _assert_escaped(str(e.value))

    path = write_dicom(tmp_path / "h.dcm", np.zeros((2, 2), np.uint16))

    class Loud:
        def as_array(self, *args, **kwargs):
            raise ValueError(f"header says {ESC}\u202eevil")  # a decoder quoting header text

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Loud())
    with pytest.raises(RecordError) as e:
        read_image(path)
    _assert_escaped(str(e.value))
    assert "\\u202e" in str(e.value)
    _assert_escaped(one_line(OSError(f"any error {ESC}")))


def _assert_escaped(msg):
    assert not any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in msg), repr(msg)
    assert "\\x1b" in msg, msg
