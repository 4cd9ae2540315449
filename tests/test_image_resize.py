"""image.resize: a round lesion in a non-square photo stays round under pad and crop, and squash stretches it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multimodal.config import ImageConfig
from multimodal.data.preprocess.image import ImagePreprocessor, placement


def _photo(path, h=60, w=120, r=15):
    """A white disc of radius r at the centre of a mid-grey h x w photo."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.full((h, w), 128, np.uint8)
    a[(yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 <= r * r] = 255
    Image.fromarray(a).save(path)
    return path


def _load(tmp_path, mode, size=60):
    cfg = ImageConfig(augment=None, size=size, resize=mode, jpeg_draft=False)
    x = ImagePreprocessor(cfg, [0.5], [0.5]).load([_photo(tmp_path / "p.png").name], tmp_path)
    return x[0, 0].numpy()


def _extent(a):
    """(height, width) of the bright disc."""
    ys, xs = np.nonzero(a > 0.9)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_squash_stretches_a_disc_pad_and_crop_keep_it_round(tmp_path):
    h, w = _extent(_load(tmp_path, "squash"))
    assert h > 1.6 * w                                              # 2:1 photo squeezed: the disc turns oval
    for mode in ("pad", "crop"):
        h, w = _extent(_load(tmp_path, mode))
        assert abs(h - w) <= 1, (mode, h, w)


def test_pad_is_black_bars_and_crop_keeps_the_centre(tmp_path):
    pad = _load(tmp_path, "pad")
    assert pad.shape == (60, 60)
    assert np.all(pad[:15] == 0) and np.all(pad[45:] == 0)        # 60x120 → 30x60, 15 rows of black each side
    assert pad[15:45].min() == pytest.approx(128 / 255, abs=0.02)  # the photo itself, untouched grey and disc
    crop = _load(tmp_path, "crop")
    assert crop.shape == (60, 60) and crop.min() == pytest.approx(128 / 255, abs=0.02)   # no padding
    assert _extent(crop) == pytest.approx(_extent(_load(tmp_path, "pad", size=120)), abs=1)  # same scale


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_placement_maps_boxes_as_preprocessing_places_pixels(tmp_path, mode):
    rh, rw, top, left = placement(60, 120, 60, mode)
    a = _load(tmp_path, mode)
    cy, cx = top + 30 * rh / 60, left + 60 * rw / 120              # where the disc's centre should land
    ys, xs = np.nonzero(a > 0.9)
    assert ys.mean() + 0.5 == pytest.approx(cy, abs=1) and xs.mean() + 0.5 == pytest.approx(cx, abs=1)


def test_an_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize"):
        ImageConfig(resize="stretch")
