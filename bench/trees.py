"""Which checkout ("tree") of the repository a benchmark process imports ``flashmaps`` from.

The package maps two folders besides ``flashmaps/`` (pyproject.toml's ``[tool.setuptools.package-dir]``:
``flashmaps.kernels`` = ``kernels/``, ``flashmaps.bench`` = ``bench/``). Putting another checkout on
PYTHONPATH therefore finds its ``flashmaps/`` but not its ``kernels/``: an editable install of this
checkout would supply that one, and the process would run two trees mixed. So the processes of a
benchmark run (workers, pytest and its xdist workers) get

    FLASHMAPS_TREE = a JSON mapping {package: folder} (or a checkout folder, whose pyproject.toml gives it)
    PYTHONPATH     = a folder holding a generated sitecustomize.py, then the PYTHONPATH they had

and that sitecustomize puts a finder first on ``sys.meta_path`` which serves exactly those folders
(submodules follow their package's folder), before any editable install's finder and before the current
directory; it then runs the sitecustomize it shadows, if there is one. The harness's own workers get the
folders this process imported (:func:`loaded_mapping`), a baseline tree's workers get that tree's
``flashmaps`` and ``flashmaps.kernels`` with this tree's ``flashmaps.bench`` (:func:`baseline_mapping`):
both sides are measured by the same harness code.

``python bench/trees.py CHECKOUT MODULE [ARGS...]`` runs MODULE as ``__main__`` from CHECKOUT (and its
child processes too) without any install: that is how ``scripts/gpu-check`` starts.

Standard library only: it runs before anything of flashmaps is imported.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["package_dirs", "loaded_mapping", "baseline_mapping", "child_env", "install", "install_from_env",
           "git_sha"]

#: the environment variable naming the tree of a process (JSON mapping or checkout folder)
ENV = "FLASHMAPS_TREE"

#: the packages whose folders a mapping names (subpackages such as flashmaps.integrations follow flashmaps)
PACKAGES = ("flashmaps", "flashmaps.kernels", "flashmaps.bench")


def _package_dir_table(pyproject: Path) -> dict[str, str]:
    text = pyproject.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one table, read by hand
        m = re.search(r"^\[tool\.setuptools\.package-dir\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        return dict(re.findall(r'^\s*"?([\w.]+)"?\s*=\s*"([^"]*)"', m.group(1), re.M)) if m else {}
    return tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})


def package_dirs(root) -> dict[str, str]:
    """{package: folder} of the checkout at ``root``: ``flashmaps`` = root/flashmaps, and the folders
    pyproject.toml maps (``flashmaps.kernels`` = root/kernels, ...)."""
    root = Path(root).resolve()
    if not (root / "flashmaps" / "__init__.py").is_file():
        raise ValueError(f"{root} is not a checkout of flashmaps (no flashmaps/__init__.py)")
    out = {"flashmaps": str(root / "flashmaps")}
    if (root / "pyproject.toml").is_file():
        for pkg, folder in _package_dir_table(root / "pyproject.toml").items():
            if pkg.startswith("flashmaps."):
                out[pkg] = str((root / folder).resolve())
    return out


def loaded_mapping() -> dict[str, str]:
    """{package: folder} this process imports flashmaps, flashmaps.kernels and flashmaps.bench from
    (without importing the kernels)."""
    out = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{pkg} is not importable as a package here")
        out[pkg] = str(Path(list(spec.submodule_search_locations)[0]).resolve())
    roots = {str(Path(out[p]).parent) for p in PACKAGES}
    if len(roots) > 1:
        warnings.warn(f"flashmaps is imported from more than one checkout ({', '.join(f'{p} from {d}' for p, d in out.items())}); "
                      "an editable install of one checkout run from another's folder does that", stacklevel=2)
    return out


def baseline_mapping(root) -> dict[str, str]:
    """The mapping of a worker that measures the checkout at ``root`` with this process's harness:
    ``root``'s flashmaps and kernels, this process's flashmaps.bench."""
    out = package_dirs(root)
    out["flashmaps.bench"] = loaded_mapping()["flashmaps.bench"]
    return out


_SITE = """# written by flashmaps.bench.trees: imports flashmaps from the tree named by {env}
import importlib.util as _u
_spec = _u.spec_from_file_location("_flashmaps_trees", {path!r})
_trees = _u.module_from_spec(_spec)
_spec.loader.exec_module(_trees)
_trees.install_from_env(chain_from=__file__)
"""
_site_dir: list = []


def _sitecustomize_dir() -> str:
    """A folder (made once per process, removed at exit) holding the sitecustomize.py of :func:`child_env`."""
    if not _site_dir:
        d = tempfile.mkdtemp(prefix="flashmaps-tree-")
        Path(d, "sitecustomize.py").write_text(_SITE.format(env=ENV, path=str(Path(__file__).resolve())))
        atexit.register(shutil.rmtree, d, True)
        _site_dir.append(d)
    return _site_dir[0]


def child_env(mapping: dict[str, str], env: dict | None = None) -> dict:
    """``env`` (default: os.environ) for a child process that imports flashmaps from ``mapping``."""
    env = dict(os.environ if env is None else env)
    site = _sitecustomize_dir()
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    env["PYTHONPATH"] = os.pathsep.join([site, *rest])
    env[ENV] = json.dumps(mapping)
    return env


def git_sha(root) -> str:
    """HEAD of the checkout at ``root`` (+ "-dirty" with uncommitted changes to tracked files), or
    "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Serves the packages of a mapping from their folders; everything else is left to the others."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = dict(mapping)

    def find_spec(self, fullname, path=None, target=None):
        folder = self.mapping.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def install(mapping: dict[str, str]) -> None:
    """Put the finder of ``mapping`` first on sys.meta_path (before an editable install's finder and
    before the current directory on sys.path)."""
    if "flashmaps" not in mapping:
        raise ValueError("a tree mapping must name the flashmaps package")
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TreeFinder)]
    sys.meta_path.insert(0, _TreeFinder(mapping))


def _mapping(spec: str) -> dict[str, str]:
    return json.loads(spec) if spec.lstrip().startswith("{") else package_dirs(spec)


def install_from_env(chain_from: str | None = None) -> None:
    """The generated sitecustomize's body: install the tree of $FLASHMAPS_TREE, then run the
    sitecustomize module that ``chain_from`` (the generated one) shadows, if any."""
    if os.environ.get(ENV):
        install(_mapping(os.environ[ENV]))
    if chain_from:
        own = os.path.dirname(os.path.abspath(chain_from))
        rest = [p for p in sys.path if os.path.abspath(p or ".") != own]
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))


def main(argv: list[str]) -> None:
    """``trees.py CHECKOUT|MAPPING MODULE [ARGS...]``: run MODULE as __main__ from that tree, and let
    every child process inherit it."""
    if len(argv) < 2:
        raise SystemExit("usage: trees.py CHECKOUT|MAPPING_JSON MODULE [ARGS...]")
    mapping, module = _mapping(argv[0]), argv[1]
    here = Path(__file__).resolve().parent
    # run as a script, this folder is sys.path[0]: its modules (plot.py, compare.py ...) must not be top-level
    sys.path[:] = [p for p in sys.path if p == "" or Path(p).resolve() != here]
    install(mapping)
    os.environ.update(child_env(mapping))
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
