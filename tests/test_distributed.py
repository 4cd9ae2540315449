"""DDP training under torchrun: 2 CPU processes (gloo) train one model that scores like one process's."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SYNTH_CONFIG

SETTINGS = ["image.size=32", "image.token_grid=1", "image.augment=null", "text.vocab_size=200", "train.epochs=6",
            "train.batch_size=16", "fusion.layers=1"]


@pytest.fixture(scope="module")
def cohort240(tmp_path_factory):
    from multimodal.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("ddp"), n=240, seed=1)


def _train(launcher, cohort, out):
    argv = [*launcher, "train", "--config", str(SYNTH_CONFIG), "--records",
            str(cohort["train"]), "--val", str(cohort["val"]), "--out", str(out), "--quiet", *SETTINGS]
    r = subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, json.loads((out / "metrics.json").read_text())


def test_two_rank_training_matches_one_rank(cohort240, tmp_path):
    one_out, one = _train([sys.executable, "-m", "multimodal.cli"], cohort240, tmp_path / "one")
    two_out, two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "multimodal.cli"], cohort240, tmp_path / "two")
    assert "x 2 processes" in two_out and two_out.count("model saved") == 1  # rank 0 alone reports and saves
    assert two["training"]["processes"] == 2 and one["training"]["processes"] == 1
    assert two["training"]["n_train"] == one["training"]["n_train"]  # every record trained on once per epoch
    a1, a2 = (m["validation"]["overall"]["auroc"]["value"] for m in (one, two))
    assert a1 > 0.7 and a2 > 0.7
    assert abs(a1 - a2) < 0.1, (a1, a2)  # 48 validation patients: the bootstrap CI is about ±0.13

    from multimodal import DiagnosisModel

    model = DiagnosisModel.load(tmp_path / "two")  # a normal model directory, loadable by one process
    assert len(model.predict(cohort240["test"])) == len(open(cohort240["test"]).read().strip().splitlines()) - 1
