"""No command reaches the network or writes under $HOME outside mmdx's named cache.

Every command runs in one subprocess with HOME set to an empty folder, no cache variables of its own,
and a spy on connection attempts at two depths: Python's socket module (what huggingface_hub, urllib
and httpx use) and, where a C compiler exists, libc's connect() and getaddrinfo() through LD_PRELOAD,
which is the only place native code sees it (ONNX Runtime's telemetry uploader is C++ with its own
curl). Each attempt is logged and refused, so the test itself can never leak. AF_UNIX is let through
unlogged: it never leaves the machine (multiprocessing's pipes, glibc asking nscd for the user's home).

With its telemetry on, ONNX Runtime resolves its upload host within this run (the libc spy sees the
lookup) and keeps a device id and an event queue under ~/.cache (the HOME listing sees them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, SYNTH_CONFIG
from multimodal.runtime import CACHES, TELEMETRY_OFF

pytest.importorskip("onnxruntime")

# Logs and refuses every socket connection that is not AF_UNIX, then runs each command through
# `multimodal.cli.main` in this one interpreter (imported after the spy, as `mmdx` imports it).
DRIVER = textwrap.dedent("""
    import errno, json, socket, sys
    log_path, commands = sys.argv[1], json.loads(sys.argv[2])

    def refuse(what, target):
        with open(log_path, "a") as f:
            f.write(f"python {what} {target!r}\\n")
        raise OSError(errno.ENETUNREACH, f"egress test: {what} refused")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if self.family != socket.AF_UNIX:
            refuse("connect", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family != socket.AF_UNIX:
            refuse("connect_ex", address)
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = lambda host, *a, **k: refuse("getaddrinfo", host)
    socket.create_connection = lambda address, *a, **k: refuse("create_connection", address)

    from multimodal.cli import main
    for argv in commands:
        code = main(argv)
        if code != 0:
            sys.exit(f"mmdx {argv[0]} exited {code}")
""")

# The same at libc: connect() to anything but AF_UNIX, and every name lookup, is logged and fails.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

static void note(const char *what, const char *detail) {
    const char *path = getenv("EGRESS_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fprintf(f, "libc %s %s\n", what, detail ? detail : "-"); fclose(f); }
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (addr && addr->sa_family != AF_UNIX) {
        char family[16];
        snprintf(family, sizeof family, "family=%d", addr->sa_family);
        note("connect", family);
        errno = ENETUNREACH;
        return -1;
    }
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    return real(fd, addr, len);
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    note("getaddrinfo", node);
    return EAI_FAIL;
}
"""

# Variables that would send a dependency's files elsewhere than its default under $HOME: the
# subprocess gets none of them, so what it writes shows where mmdx itself sends them.
CLEARED = {"MMDX_CACHE", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE", "DISABLE_TELEMETRY", "LD_PRELOAD", *TELEMETRY_OFF,
           *(v for var, _, preferred in CACHES for v in (var, *preferred))}

SMALL = ["image.size=64", "image.token_grid=2", "image.augment=null", "text.encoder=bow", "text.vocab_size=200",
         "train.epochs=1", "train.batch_size=16", "fusion.layers=1"]  # bow and a 2x2 pool: exportable


def _commands(w: Path) -> list:
    c, m = w / "cohort", w / "model"
    config = SYNTH_CONFIG
    train, val, test = (c / f"records_{s}.csv" for s in ("train", "val", "test"))
    cmds = [["synth", "--out", c, "--n", 60],
            ["train", "--config", config, "--records", train, "--val", val, "--out", m, "--quiet", *SMALL],
            ["predict", "--model", m, "--records", test, "--out", w / "p.csv", "--quiet"],
            ["export", "--model", m, "--records", val, "--out", w / "m.onnx", "--quiet"],
            ["predict", "--model", m, "--onnx", w / "m.onnx", "--records", test, "--out", w / "po.csv", "--quiet"],
            ["evaluate", "--model", m, "--records", test, "--n-boot", 20, "--plots", w / "plots", "--quiet"],
            ["explain", "--model", m, "--records", test, "--out", w / "ex", "--n-steps", 4, "--quiet"],
            ["compare", w / "p.csv", w / "po.csv", "--labels", c / "truth.csv", "--n-boot", 20],
            # the image baseline's CV fits alone took 30 s on 2 busy cores; it reads packaged weights
            ["baselines", "--config", config, "--records", train, "--predict", test, "--out", w / "bl",
             "--image-weights", "none"],
            ["cv", "--config", config, "--records", train, "--folds", 2, "--out", w / "cv", "--n-boot", 20,
             "--quiet", *SMALL, "modalities=text,tabular"]]  # train already ran the image branch
    return [[str(a) for a in cmd] for cmd in cmds]


def _shim(tmp_path: Path):
    """The LD_PRELOAD spy, or None where no C compiler is installed (the Python spy still runs)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src, lib = tmp_path / "spy.c", tmp_path / "spy.so"
    src.write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def test_no_command_connects_anywhere_or_writes_under_home_outside_the_cache(tmp_path):
    home, work, scratch, log = tmp_path / "home", tmp_path / "work", tmp_path / "tmp", tmp_path / "egress.log"
    for d in (home, work, scratch):
        d.mkdir()
    env = _clean_env()
    env.update(HOME=str(home), TMPDIR=str(scratch), EGRESS_LOG=str(log), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    shim = _shim(tmp_path)
    if shim:
        env["LD_PRELOAD"] = str(shim)
    r = subprocess.run([sys.executable, "-c", DRIVER, str(log), json.dumps(_commands(work))], env=env, cwd=work,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    attempts = log.read_text().splitlines() if log.exists() else []
    assert attempts == [], attempts
    cache = home / ".cache" / "mmdx"  # MMDX_CACHE's default: the one place mmdx may write under $HOME
    stray = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                   if p not in (home / ".cache", cache) and cache not in p.parents)
    assert stray == [], stray
    assert list(scratch.iterdir()) == []  # and nothing is left in the temp folder
    assert (cache / "matplotlib").is_dir()  # evaluate's plots built matplotlib's font cache where README says


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in CLEARED}


def _after_import(extra_env: dict, code: str = "") -> tuple:
    """(the environment, stderr) of a fresh interpreter that ran `code`, then imported multimodal."""
    env = {**_clean_env(), "PYTHONPATH": str(REPO), **extra_env}
    script = f"{code}\nimport json, os, multimodal\nprint(json.dumps(dict(os.environ)))"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def test_importing_the_api_turns_telemetry_off_and_keeps_the_users_own_locations(tmp_path):
    env, _ = _after_import({"HOME": str(tmp_path), "ORT_DISABLE_TELEMETRY": "0", "HF_HOME": str(tmp_path / "hf"),
                             "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert env["ORT_DISABLE_TELEMETRY"] == "1" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"  # never the user's 0
    assert all(env[k] == v for k, v in TELEMETRY_OFF.items())  # DO_NOT_TRACK, hf_xet's
    assert "HF_HUB_OFFLINE" not in env  # the hub stays reachable for a model the user names
    assert env["MPLCONFIGDIR"] == str(tmp_path / "mpl") and "HF_HUB_CACHE" not in env  # their choice stands
    assert not any(tmp_path.iterdir())  # importing writes nothing


def test_hub_telemetry_is_off_even_when_the_hub_was_imported_first(tmp_path):
    pytest.importorskip("huggingface_hub")
    code = "import huggingface_hub.constants as c; assert not c.HF_HUB_DISABLE_TELEMETRY"
    out, _ = _after_import({"HOME": str(tmp_path)}, code + "\nimport multimodal\nassert c.HF_HUB_DISABLE_TELEMETRY")
    assert out["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_onnxruntime_imported_first_is_said_since_its_telemetry_can_no_longer_be_stopped(tmp_path):
    _, err = _after_import({"HOME": str(tmp_path)}, "import onnxruntime")
    assert "onnxruntime was imported before multimodal" in err and "ORT_DISABLE_TELEMETRY=1" in err
    _, err = _after_import({"HOME": str(tmp_path), "ORT_DISABLE_TELEMETRY": "1"}, "import onnxruntime")
    assert "onnxruntime" not in err  # it was off from the start: nothing to say
