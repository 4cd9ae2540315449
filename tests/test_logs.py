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
    code, out, err = run_cli(capsys, "predict", "--model", tmp_path / "m", "--records", cohort["test"], "--out",
                             tmp_path / "p.csv")
    assert code == 0 and "mmdx: predict: " in err and "rec/s" in err


def test_quiet_keeps_only_the_summary(capsys, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDX_PROGRESS_SECONDS", "0")
    code, out, err = run_cli(capsys, "train", "--config", SYNTH_CONFIG, "--records",
                             cohort["train"], "--val", cohort["val"], "--out", tmp_path / "m", "--quiet", *ARGS)
    assert code == 0 and err == "" and "model saved" in out
