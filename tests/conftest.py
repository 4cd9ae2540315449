"""Shared fixtures: a tiny synthetic cohort and one tiny trained model per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Feature caches and converted weights go to a throwaway folder, never the user's ~/.cache/mmdx, and the
# folder goes when the session ends.
if "MMDX_CACHE" not in os.environ:
    os.environ["MMDX_CACHE"] = tempfile.mkdtemp(prefix="mmdx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMDX_CACHE"], ignore_errors=True)

from multimodal.runtime import tune_malloc  # noqa: E402

tune_malloc()  # the suite trains and predicts as `mmdx` does (and faster: less time faulting pages in)

from multimodal.synth import config_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SYNTH_CONFIG = config_path()  # the synthetic cohort's config, package data beside its generator

# Small enough to train in seconds on 2 CPU cores; the real settings are in SYNTH_CONFIG.
# The suite tests the joint network by default; tests/test_strategies.py covers the per-modality ones.
TINY = {"image.size": 32, "image.token_grid": 1, "image.augment": None, "text.vocab_size": 200,
        "train.epochs": 2, "train.batch_size": 16, "fusion.layers": 1, "fusion.strategy": "joint",
        "train.alone": {}}


def shared(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not present")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """For a module of Integrated Gradients passes (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on 2 shared cores, intra-op threads that spin against other processes make them 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    from multimodal.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), n=120, seed=1)


@pytest.fixture(scope="session")
def tiny_model(cohort):
    from multimodal import DiagnosisModel

    return DiagnosisModel.from_config(SYNTH_CONFIG, **TINY).fit(
        cohort["train"], cohort["val"], progress=False)


def run_cli(capsys, *argv):
    """`mmdx ARGV` in-process → (exit code, stdout, stderr)."""
    from multimodal.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle):
    """What every user mistake must look like: exit 2 and one `mmdx: error:` line naming the problem."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmdx: error:") and needle in lines[0], err
    assert "Traceback" not in err
