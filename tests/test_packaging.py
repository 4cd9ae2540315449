"""The wheel carries what the packages read at run time, and the demo finds its config without the repository.

`pip install .` then `mmdx demo` is the first thing a newcomer runs: any file the code reads from beside
itself that the wheel leaves out breaks it only there, never in the repository where the tests run.
"""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from conftest import REPO

PROBE = """
import sys
from pathlib import Path
import multimodal.demo
from multimodal.config import load_config
from multimodal.synth import config_path

site = Path(sys.argv[1]).resolve()
assert site in Path(multimodal.demo.__file__).resolve().parents, multimodal.demo.__file__
assert site in config_path().resolve().parents, config_path()
print(load_config(config_path()).name)
"""


def _packages() -> list[str]:
    """The top-level folders pyproject.toml packages (`packages.find.include`, e.g. "multimodal*")."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"]]


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources: building in place would leave build/ and egg-info in the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in _packages():
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp / "dist").glob("mmdx-*.whl")
    return wheel


def test_wheel_holds_every_data_file_and_the_demo_config_loads_from_it(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "multimodal/synth/config.yaml" in names
    data = {p.relative_to(REPO).as_posix() for pkg in _packages() for p in (REPO / pkg).rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert data and data <= names, f"left out of the wheel: {sorted(data - names)}"

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(site)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "synthetic"
