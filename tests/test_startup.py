"""`mmdx --help` and the start of a batch job must not pay for libraries they do not use."""
import json
import subprocess
import sys

HEAVY = ["torch", "timm", "transformers", "sklearn", "captum", "matplotlib", "scipy", "pydicom", "jinja2"]


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
