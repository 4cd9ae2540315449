"""The frozen-feature cache is keyed by everything that determines the features: a series folder's
slices, and the frozen part's own weights (a random-init encoder's seed)."""
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SYNTH_CONFIG

pytest.importorskip("pydicom")

SETTINGS = {"modalities": "image", "image.encoder": "test_resnet", "image.size": 32, "image.token_grid": 1,
            "image.augment": None, "image.freeze": "all", "image.cache_features": True, "image.max_images": 2}


def _config(**over):
    from multimodal.config import load_config

    return load_config(SYNTH_CONFIG, {**SETTINGS, **over})


def _encoder(cfg, seed):
    from encoders import ENCODERS

    torch.manual_seed(seed)
    ic = cfg.image
    return ENCODERS.create("timm", model_name=ic.encoder, in_chans=ic.in_chans, image_size=ic.size,
                           token_grid=ic.token_grid, freeze=ic.freeze).eval()


def test_random_init_frozen_encoders_of_two_seeds_have_two_keys():
    from multimodal.data.features import identity

    cfg = _config()
    a, b, a_again = _encoder(cfg, 0), _encoder(cfg, 1), _encoder(cfg, 0)
    assert identity(cfg, a, "random-init") != identity(cfg, b, "random-init")
    assert identity(cfg, a, "random-init") == identity(cfg, a_again, "random-init")  # same weights: shared
    assert identity(_config(**{"image.jpeg_draft": False}), a, "random-init") != identity(cfg, a, "random-init")
    partial = _config(**{"image.freeze": 1})
    with torch.no_grad():  # a trainable stage's weights do not shape the cached (frozen) activations
        c, d = _encoder(partial, 0), _encoder(partial, 0)
        next(p for p in d.parameters() if p.requires_grad).add_(1.0)
        assert identity(partial, c, "random-init") == identity(partial, d, "random-init")
        next(p for p in d.parameters() if not p.requires_grad).add_(1.0)
        assert identity(partial, c, "random-init") != identity(partial, d, "random-init")


def _write_series(folder, level):
    """Three slices whose pixels are `level` (same sizes whatever the level)."""
    from test_series import _slice

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        _slice(folder / f"IM{k}.dcm", k * 5.0, k + 1, value=level)


def test_replacing_a_series_folders_slices_at_the_same_path_recomputes_its_features(tmp_path):
    from multimodal.data.features import FeatureCache
    from multimodal.data.preprocess import Preprocessing
    from multimodal.data.records import load_records

    root = tmp_path / "cohort"
    _write_series(root / "ct", level=40)
    pd.DataFrame({"patient_id": ["p1", "p2"], "image_path": ["ct", "ct"], "label": [0, 1]}).to_csv(
        root / "records.csv", index=False)
    cfg = _config(**{"image.window": "none"})
    rec = load_records(root / "records.csv", cfg, labels=True)
    prep, enc = Preprocessing.fit(cfg, rec), _encoder(cfg, 0)

    def fill():
        cache = FeatureCache(cfg, prep, enc, "random-init", root=tmp_path / "cache")
        cache.fill(rec)
        return cache

    first = fill()
    assert first.misses == 2 and fill().hits == 2  # computed for both records, then found
    direct = lambda: enc.frozen_features(prep.image.normalize(prep.image.load(["ct"], root)))  # noqa: E731

    other = tmp_path / "second_cohort"  # another cohort copied over the first, file by file
    _write_series(other / "ct", level=200)
    for p in sorted((other / "ct").iterdir()):
        os.replace(p, root / "ct" / p.name)
    second = fill()
    assert second.misses == 2
    assert not torch.allclose(second.get(0), first.get(0))
    assert torch.allclose(second.get(0), direct().to(torch.float16).float(), atol=1e-3)

    time.sleep(0.05)  # rewritten in place, same size, mtime set back (cp -p): the ctime still moves
    stamps = {p: p.stat().st_mtime_ns for p in (root / "ct").iterdir()}
    _write_series(root / "ct", level=90)
    for p, ns in stamps.items():
        os.utime(p, ns=(ns, ns))
    third = fill()
    assert third.misses == 2 and not torch.allclose(third.get(0), second.get(0))
    np.testing.assert_allclose(third.get(0).numpy(), direct().to(torch.float16).float().numpy(), atol=1e-3)
