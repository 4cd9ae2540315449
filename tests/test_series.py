"""A folder of slices as one image cell: anatomical order, evenly spaced, one series only."""
import numpy as np
import pytest

from multimodal.errors import RecordError


def _slice(path, z, instance, series="1.2.3.4", value=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = series, "CT", instance
    ds.PatientName = "SECRET^NAME"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(z)]
    arr = np.full((16, 16), int(value if value is not None else z), np.uint16)
    arr[0, 0] = 0  # a range, so min-max keeps the slice's level visible
    arr[0, 1] = 200
    ds.set_pixel_data(arr, "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def series_dir(tmp_path):
    d = tmp_path / "ct"
    d.mkdir()
    zs = np.random.default_rng(0).permutation(20)  # file names say nothing about the order
    for k, z in enumerate(zs):
        _slice(d / f"IM{k:04d}.dcm", z * 5.0, instance=20 - int(z), value=10 * z)
    return d


def _cfg(**kw):
    from multimodal.config import ImageConfig

    return ImageConfig(size=16, augment=None, window="none", **kw)


def test_slices_come_in_position_order_evenly_spaced(series_dir):
    from multimodal.data.preprocess.image import ImagePreprocessor

    prep = ImagePreprocessor(_cfg(max_images=5), [0.5], [0.5])
    x = prep.load([series_dir.name], series_dir.parent)
    assert x.shape == (5, 1, 16, 16)
    levels = x[:, 0, 8, 8].numpy() * 200  # back to the stored value 10 * z
    np.testing.assert_allclose(levels, [0, 50, 100, 140, 190], atol=1.0)  # z = 0, 5, 10, 14, 19 of 0..19


def test_a_folder_of_two_series_is_refused_without_uids_in_the_message(series_dir):
    from multimodal.data.preprocess.image import ImagePreprocessor

    _slice(series_dir / "scout.dcm", 0, 1, series="9.9.9.9")
    with pytest.raises(RecordError) as e:
        ImagePreprocessor(_cfg(), [0.5], [0.5]).load([series_dir.name], series_dir.parent)
    msg = str(e.value)
    assert "mixes 2 DICOM series" in msg and "9.9.9" not in msg and "1.2.3" not in msg and "SECRET" not in msg


def test_instance_number_orders_slices_without_positions(tmp_path):
    from multimodal.data.series import series_slices

    d = tmp_path / "mr"
    d.mkdir()
    for k, inst in enumerate([3, 1, 2]):
        _slice(d / f"s{k}.dcm", 0, inst)
    import pydicom

    for p in d.iterdir():
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    order = [pydicom.dcmread(p).InstanceNumber for p in series_slices(d, 10, "mr")]
    assert order == [1, 2, 3]
