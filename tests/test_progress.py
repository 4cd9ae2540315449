"""Progress: one line (or one bar) per unit of progress, never two for the same count."""
import logging
import re

import pandas as pd
import pytest

from conftest import run_cli
from multimodal import progress


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("progress") / "m"
    tiny_model.save(d)
    return d


def test_the_last_count_is_written_once(caplog):
    """close() wrote the final count again after update() had just written it: two lines for the last
    step, and for a run of one step (a predict of one chunk) two lines in all."""
    with caplog.at_level(logging.INFO, logger="mmdx"):
        bar = progress._LogLines(desc="predict", unit="rec", every=0)
        bar.update(10)
        bar.update(4)
        bar.close()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["predict: 10 rec", "predict: 14 rec"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmdx"):
        slow = progress._LogLines(desc="predict", unit="rec", every=0)
        slow.update(5)
        slow.every = 3600  # the next step comes sooner than a line is due: close gives its count
        slow.update(5)
        slow.every = 0
        slow.close()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["predict: 5 rec", "predict: 10 rec"]


@pytest.mark.parametrize("chunk_rows", [10, 10_000])
def test_predict_writes_one_progress_line_per_chunk(capsys, model_dir, cohort, tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setenv("MMDX_PROGRESS_SECONDS", "0")  # a line per step, so a short run shows them
    bars = []
    init = progress._LogLines.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        if type(self) is progress._LogLines:  # an enabled bar, not the --quiet one
            bars.append(self.desc)

    monkeypatch.setattr(progress._LogLines, "__init__", spy)
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--records", cohort["test"], "--out",
                             tmp_path / "p.csv", "--chunk-rows", chunk_rows)
    assert code == 0, err
    counts = [int(n) for n in re.findall(r"^mmdx: predict: (\d+) rec", err, re.MULTILINE)]
    n = len(pd.read_csv(cohort["test"]))
    want = list(range(chunk_rows, n, chunk_rows)) + [n]  # one line per chunk, the last with every row
    assert counts == want, err
    assert bars == ["predict"]  # one bar for the run, none nested inside it per chunk
