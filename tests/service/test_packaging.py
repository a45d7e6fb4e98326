"""Import names: the user's folders live under ``loquetier.*``; no top-level ``kernels``
shadows Hugging Face's (transformers probes it). Proven in this venv and in a fresh
editable install."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"kernels": "kernels", "workers": "workers", "producers": "producers", "migrations": "migrations"}

PROBE = """
import importlib.util, json
import transformers
from transformers.utils import import_utils
spec = importlib.util.find_spec("kernels")
import loquetier.kernels, loquetier.workers, loquetier.producers, loquetier.migrations
print(json.dumps({
    "kernels_top_level": spec.origin if spec else None,
    "hf_kernels_available": import_utils.is_kernels_available(),
    "files": {n: getattr(loquetier, n).__file__ for n in ("kernels", "workers", "producers", "migrations")},
}))
"""


def test_loquetier_namespace_maps_the_folders() -> None:
    import loquetier.kernels
    import loquetier.migrations
    import loquetier.producers
    import loquetier.workers

    for name, folder in FOLDERS.items():
        module = getattr(loquetier, name)
        assert Path(module.__file__).resolve() == ROOT / folder / "__init__.py"


def test_transformers_imports_beside_our_kernels() -> None:
    import transformers
    from transformers.utils import import_utils

    import loquetier.kernels  # noqa: F401

    assert transformers.__version__
    import_utils.is_kernels_available()  # the probe that a top-level `kernels` would fool


def _run_probe(python: Path | str, cwd: Path) -> dict[str, object]:
    import json

    argv = [str(python), "-c", PROBE]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _outside(path: object, root: Path) -> bool:
    return path is None or not Path(str(path)).resolve().is_relative_to(root)


def test_fresh_editable_install(tmp_path: Path) -> None:
    """pip install -e into a throwaway venv that sees this venv's packages (torch, ...)."""
    src = tmp_path / "src"
    for name in ["pyproject.toml", "README.md", "loquetier", *FOLDERS.values()]:
        source = ROOT / name
        if source.is_dir():
            _copy_tree(source, src / name)
        elif source.exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(source.read_bytes())
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line (not a site dir): our venv's packages, but not its editable finder.
    (Path(child_site) / "parent_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-e", str(src), "--no-deps", "--no-build-isolation"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    probe = _run_probe(python, cwd=tmp_path)
    assert _outside(probe["kernels_top_level"], src) and _outside(probe["kernels_top_level"], ROOT)
    files = probe["files"]
    assert isinstance(files, dict)
    for name, folder in FOLDERS.items():
        assert Path(files[name]).resolve() == (src / folder / "__init__.py").resolve(), name


def _copy_tree(source: Path, dest: Path) -> None:
    for path in source.rglob("*"):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        target = dest / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
