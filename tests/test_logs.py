"""Progress in a log file is plain lines, not terminal frames; --quiet leaves only the summary."""
from conftest import SYNTH_CONFIG, TINY, run_cli

ARGS = [f"{k}={v}" for k, v in TINY.items() if v is not None] + ["image.augment=null"]


def test_progress_is_periodic_lines_off_a_terminal(capsys, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDX_PROGRESS_SECONDS", "0")  # a line per step, so a short run shows them
    code, out, err = run_cli(capsys, "train", "--config", SYNTH_CONFIG, "--records",
                             cohort["train"], "--val", cohort["val"], "--out", tmp_path / "m", *ARGS)
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err  # no tqdm frames in a file
    lines = err.strip().splitlines()
    assert any(line.startswith("mmdx: epoch 1/2: ") and "batch" in line for line in lines), err
    assert any(line.startswith("mmdx: epoch 2/2  loss") for line in lines), err
    estimate = [line for line in lines if line.startswith("mmdx: cost estimate: ")]
    assert len(estimate) == 1 and "at most 2 epochs" in estimate[0], err          # once, before epoch 1 ends
    assert lines.index(estimate[0]) < next(i for i, line in enumerate(lines) if line.startswith("mmdx: epoch 1/2  loss"))
    code, out, err = run_cli(capsys, "predict", "--model", tmp_path / "m", "--records", cohort["test"], "--out",
                             tmp_path / "p.csv")
    assert code == 0 and "mmdx: predict: " in err and "rec/s" in err


def test_quiet_keeps_only_the_summary(capsys, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDX_PROGRESS_SECONDS", "0")
    code, out, err = run_cli(capsys, "train", "--config", SYNTH_CONFIG, "--records",
                             cohort["train"], "--val", cohort["val"], "--out", tmp_path / "m", "--quiet", *ARGS)
    assert code == 0 and err == "" and "model saved" in out


def test_the_cost_estimate_counts_every_batch_epoch_and_network(monkeypatch):
    """2 s per batch (the first, start-up, not counted), 10 training and 3 validation batches an epoch,
    5 epochs, 3 networks: at most (10 + 2/3 x 3) x 2 s x 5 x 3 = 6 min."""
    import multimodal.training.loop as loop

    now = [0.0]

    def batches():
        for i in range(10):
            now[0] += 2.0 if i else 30.0
            yield i

    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    said = []
    monkeypatch.setattr(loop, "say", said.append)
    seen = list(loop.CostEstimate(batches(), 10, 3, 5, 3))
    assert seen == list(range(10))
    assert said == ["cost estimate: 2 s per batch, an epoch about 24 s; at most 5 epochs × 3 networks ≈ 6 min"]
