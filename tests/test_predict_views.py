"""image.predict_views: all. A record listing more images than max_images is scored once per group of
them and the logits averaged, the same through PyTorch and ONNX Runtime; the default reads the first."""

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY

Image = pytest.importorskip("PIL.Image")


def _dataset(tmp_path, views, n_files=5, max_images=2):
    """Record p lists n_files grey PNGs; pixel value 10 (k + 1) / 255 names file k. Record q lists one."""
    from test_image_limits import _views_dataset

    return _views_dataset(tmp_path, "first", train=False, n_files=n_files, max_images=max_images, predict_views=views)


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
