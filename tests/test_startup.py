"""`mmdx --help` and the start of a batch job must not pay for libraries they do not use."""
import json
import subprocess
import sys

HEAVY = ["torch", "timm", "transformers", "sklearn", "captum", "matplotlib", "scipy", "pydicom", "jinja2", "ray", "flwr"]


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_heavy_library():
    code = ("import contextlib, io\nimport multimodal.cli as c\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    c.main(['--help'])\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    c.main(['predict', '--help'])")
    assert _loaded_after(code) == []


def test_package_import_is_lazy_and_still_exports():
    assert _loaded_after("import multimodal") == []
    assert _loaded_after("from multimodal import UserError") == []
    assert "torch" in _loaded_after("from multimodal import DiagnosisModel")


def test_predict_path_skips_explain_and_training_only_libraries():
    loaded = _loaded_after("from multimodal.api import DiagnosisModel")
    assert "torch" in loaded
    assert not {"sklearn", "captum", "matplotlib", "transformers", "jinja2"} & set(loaded)


_FAULTS = """
import ctypes, os, resource, sys
from multimodal.runtime import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def round_trip():  # a batch's activations: several MB-sized buffers, written, then all freed
    bufs = [libc.malloc(8 << 20) for _ in range(4)]
    for b in bufs:
        libc.memset(b, 1, 8 << 20)
    for b in reversed(bufs):
        libc.free(b)
for _ in range(3):
    round_trip()  # glibc's dynamic thresholds settle
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    import os

    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("MMDX_MALLOC", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env=clean | env).stdout.split()
    return out[0], int(out[1])


def test_tuned_malloc_keeps_freed_batch_memory_instead_of_faulting_it_in_again():
    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    applied, tuned = _faults("tuned")
    assert applied == "True"
    _, default = _faults("default")
    pages = 10 * 4 * (8 << 20) // 4096  # every page of every round, were it returned each time
    assert default > pages // 2  # glibc's own settings give the memory back each round ...
    assert tuned < pages // 20  # ... the tuned process reuses it
    # a user's own malloc settings, or MMDX_MALLOC=default, are left alone
    assert _faults("tuned", MALLOC_ARENA_MAX="2")[0] == "False"
    assert _faults("tuned", MMDX_MALLOC="default")[0] == "False"


def test_mmdx_command_skips_teardown_but_runs_exit_handlers_and_keeps_its_code(tmp_path):
    """entry() ends with os._exit: what a normal exit would still do must happen first."""
    log = tmp_path / "mmdx.log"
    code = ("import atexit, logging, sys\n"
            f"h = logging.FileHandler({str(log)!r}); logging.getLogger('probe').addHandler(h)\n"
            "logging.getLogger('probe').warning('buffered line')\n"
            "atexit.register(lambda: print('exit handler ran'))\n"
            "sys.stdout.write('unflushed output ')\n"
            "sys.argv = ['mmdx', 'predict', '--model', 'no-such-model', '--records', 'r.csv', '--out', "
            f"{str(tmp_path / 'p.csv')!r}]\n"
            "from multimodal.cli import entry\nentry()\nprint('not reached')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == "unflushed output exit handler ran\n"
    assert r.stderr == "mmdx: error: no-such-model: not a model directory (no such folder)\n"
    assert log.read_text() == "buffered line\n"
    assert not (tmp_path / "p.csv").exists()
