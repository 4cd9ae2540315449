"""image.predict_views: all. A record listing more images than max_images is scored once per group of
them and the logits averaged, the same through PyTorch and ONNX Runtime; the default reads the first.
image.predict_flips: each group is also scored mirrored, as groups of their own."""

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY

Image = pytest.importorskip("PIL.Image")


def _dataset(tmp_path, views, n_files=5, max_images=2, **image):
    """Record p lists n_files grey PNGs; pixel value 10 (k + 1) / 255 names file k. Record q lists one."""
    from test_image_limits import _views_dataset

    return _views_dataset(tmp_path, "first", train=False, n_files=n_files, max_images=max_images,
                          predict_views=views, **image)


def _files(x) -> list[int]:
    return [round(float(v[0, 0, 0]) * 255 / 10) - 1 for v in x]


def test_all_views_come_in_groups_of_max_images_in_listed_order(tmp_path):
    from multimodal.data.batches import Collate

    ds = _dataset(tmp_path, "all")
    item = ds[0]
    assert _files(item["image"]) == [0, 1, 2, 3, 4]
    assert item["image_group"].tolist() == [0, 0, 1, 1, 2]
    batch = Collate(ds.prep, ds.mods, ds.cfg)([ds[0], ds[1]])
    assert batch["image_group"].tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, 0, 0]]
    assert batch["image_mask"].tolist() == [[True] * 5, [True, False, False, False, False]]
    assert "image_group" not in Collate(ds.prep, ds.mods, ds.cfg)([ds[1]])  # one group: the plain path
    (tmp_path / "first").mkdir()
    first = _dataset(tmp_path / "first", "first")[0]
    assert _files(first["image"]) == [0, 1] and "image_group" not in first


def test_all_views_stop_at_sixteen_groups(tmp_path):
    item = _dataset(tmp_path, "all", n_files=20, max_images=1)[0]
    assert _files(item["image"]) == list(range(16)) and item["image_group"].tolist() == list(range(16))


def test_flips_are_groups_of_their_own_after_the_images_as_they_are(tmp_path):
    import torch
    from multimodal.data.batches import Collate

    ds = _dataset(tmp_path, "all", predict_flips=4)
    grad = torch.arange(16.0).view(1, 1, 1, 16) + torch.arange(16.0).view(1, 1, 16, 1) * 16
    decode = ds.prep.image.load_groups  # every pixel also named by its place, to see the mirrors
    ds.prep.image.load_groups = lambda *a, **k: (decode(*a, **k)[0] + grad, decode(*a, **k)[1])
    item = ds[0]
    x, plain = item["image"], _files(item["image"][:5] - grad)
    assert plain == [0, 1, 2, 3, 4] and item["image_group"].tolist() == [g + 3 * k for k in range(4)
                                                                          for g in [0, 0, 1, 1, 2]]
    assert torch.equal(x[5:10], x[:5].flip(-1)) and torch.equal(x[10:15], x[:5].flip(-2))
    assert torch.equal(x[15:], x[:5].flip(-1, -2))
    one = ds[1]  # a single image: its group and its mirrors, so the batch carries image_group
    assert one["image_group"].tolist() == [0, 1, 2, 3]
    assert "image_group" in Collate(ds.prep, ds.mods, ds.cfg)([one])
    (tmp_path / "first").mkdir()
    first = _dataset(tmp_path / "first", "first", predict_flips=2)[0]
    assert _files(first["image"]) == [0, 1, 0, 1] and first["image_group"].tolist() == [0, 0, 1, 1]
    (tmp_path / "explain").mkdir()
    shown = _dataset(tmp_path / "explain", "all", predict_flips=2)
    from multimodal.data.batches import RecordDataset
    as_is = RecordDataset(shown.records, shown.prep, shown.mods, shown.cfg, views="first")[0]
    assert _files(as_is["image"]) == [0, 1] and "image_group" not in as_is  # what explanations read


def test_flips_refuse_cached_features():
    from multimodal.config import ImageConfig

    with pytest.raises(ValueError, match="predict_flips scores mirrored images"):
        ImageConfig(predict_flips=2, freeze="all", cache_features=True)
    with pytest.raises(ValueError):
        ImageConfig(predict_flips=3)


def test_all_views_refuse_cached_features():
    from multimodal.config import ImageConfig

    with pytest.raises(ValueError, match="predict_views: all scores every image"):
        ImageConfig(predict_views="all", freeze="all", cache_features=True)


@pytest.fixture(scope="module")
def views_model(cohort):
    from multimodal import DiagnosisModel

    return DiagnosisModel.from_config(SYNTH_CONFIG, **TINY, **{
        "image.max_images": 1, "image.predict_views": "all", "text.encoder": "bow"}).fit(cohort["train"], cohort["val"], progress=False)


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _three_views(cohort, *models):
    """Six test records, each listing its own image and two others; and each image as a record alone.
    DataFrames: their paths resolve against the models' image root, set here to the cohort's folder."""
    for m in models:
        m.config.data.image_root = str(cohort["dir"])
    df = pd.read_csv(cohort["test"]).head(6).reset_index(drop=True)
    paths = list(df["image_path"])
    lists = [[paths[i], paths[(i + 1) % 6], paths[(i + 2) % 6]] for i in range(6)]
    many = df.assign(image_path=[";".join(p) for p in lists])
    single = pd.concat([df.iloc[[i]].assign(image_path=p) for i in range(6) for p in lists[i]], ignore_index=True)
    return many, single


def test_all_views_score_the_mean_logit_of_each_image(views_model, cohort):
    many, single = _three_views(cohort, views_model)
    col = f"prob_{views_model.classes[-1]}"
    got = views_model.predict(many)
    assert (got["status"] == "ok").all() and len(got) == 6
    each = _logit(views_model.predict(single)[col].to_numpy()).reshape(6, 3)
    np.testing.assert_allclose(_logit(got[col].to_numpy()), each.mean(1), atol=1e-4)
    assert np.abs(each[:, 0] - each.mean(1)).max() > 1e-3  # the other views do change the score


def test_flips_score_the_mean_logit_of_the_image_and_its_mirror(views_model, cohort, tmp_path):
    df = pd.read_csv(cohort["test"]).head(6).reset_index(drop=True)
    pydicom = pytest.importorskip("pydicom")
    for i, rel in enumerate(df["image_path"]):
        d = pydicom.dcmread(cohort["dir"] / rel)
        d.save_as(tmp_path / f"a{i}.dcm")
        d.PixelData = np.ascontiguousarray(d.pixel_array[..., ::-1]).tobytes()
        d.save_as(tmp_path / f"m{i}.dcm")
    views_model.config.data.image_root = str(tmp_path)
    as_is, mirrored = (df.assign(image_path=[f"{c}{i}.dcm" for i in range(6)]) for c in "am")
    col = f"prob_{views_model.classes[-1]}"
    each = np.stack([_logit(views_model.predict(d)[col].to_numpy()) for d in (as_is, mirrored)], 1)
    views_model.config.image.predict_flips = 2
    try:
        got = _logit(views_model.predict(as_is)[col].to_numpy())
    finally:
        views_model.config.image.predict_flips = 1
    np.testing.assert_allclose(got, each.mean(1), atol=1e-4)
    assert np.abs(each[:, 0] - each[:, 1]).max() > 1e-3  # the mirror does change the score


def test_all_views_through_onnx_match_pytorch(views_model, cohort, tmp_path):
    pytest.importorskip("onnxruntime")
    from multimodal import DiagnosisModel

    views_model.save(tmp_path / "m")
    loaded = DiagnosisModel.load(tmp_path / "m")
    many, _ = _three_views(cohort, loaded)
    col = f"prob_{loaded.classes[-1]}"
    torch_p = loaded.predict(many)[col].to_numpy()
    loaded.export_onnx(tmp_path / "m.onnx", cohort["test"])
    onnx_p = loaded.use_onnx(tmp_path / "m.onnx").predict(many)[col].to_numpy()
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-5)
