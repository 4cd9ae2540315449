"""The same config, data and seed give the same model: byte for byte, in separate processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pandas as pd

from conftest import REPO, SYNTH_CONFIG, TINY


def test_wordpiece_vocabulary_is_the_same_on_every_run(cohort):
    """The trainer's tie order came from hash-map iteration: 6 runs over one cohort gave 6 vocabularies."""
    from multimodal.config import TextConfig
    from multimodal.data.preprocess.text import TextPreprocessor

    texts = pd.read_csv(cohort["train"])["report_text"].tolist()
    cfg = TextConfig(vocab_size=300)
    vocabularies = {TextPreprocessor.train(texts, cfg).to_json() for _ in range(6)}
    assert len(vocabularies) == 1
    assert TextPreprocessor.train(texts, cfg).vocab_size > 100  # a real vocabulary, not only the alphabet


_FIT = textwrap.dedent("""
    import sys
    from multimodal import DiagnosisModel
    model = DiagnosisModel.from_config(sys.argv[1], **eval(sys.argv[2])).fit(sys.argv[3], sys.argv[4], progress=False)
    model.save(sys.argv[5])
    model.predict(sys.argv[6]).to_csv(sys.argv[7], index=False)
""")


def test_two_processes_train_byte_identical_models(cohort, tmp_path):
    """Separate processes (another PYTHONHASHSEED each, as two runs of `mmdx train` would have)."""
    runs = []
    for i, hash_seed in enumerate(("1", "2")):
        out, preds = tmp_path / f"m{i}", tmp_path / f"p{i}.csv"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _FIT, str(SYNTH_CONFIG), repr(TINY),
                        str(cohort["train"]), str(cohort["val"]), str(out), str(cohort["test"]), str(preds)],
                       env=env, check=True, capture_output=True, cwd=REPO)
        runs.append((out, preds))
    (a, pa), (b, pb) = runs
    for name in ("model.safetensors", "tokenizer.json", "preprocessing.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert pa.read_bytes() == pb.read_bytes()
