"""The package installs from a wheel and runs outside the source tree: its configs ship in
it and every import is declared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installed_outside_the_tree_trains(tmp_path):
    # Built without isolation (no index needed): the environment's setuptools builds it.
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools.__version__} predates pyproject-only builds")
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                          str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    # The installed copy first on the path (dependencies still come from this environment).
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import vocoder; print(vocoder.__file__)"],
                           check=True, cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(site))
    result = subprocess.run(
        [sys.executable, "-m", "vocoder.cli.train", "model=teacher", "data=demo",
         "experiment=debug", "data.n_utterances=12", "data.cache_dir=cache", "run_dir=run",
         "trainer.max_steps=2", "trainer.device=cpu"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (work / "run" / "checkpoints" / "last.pt").is_file()


def test_every_third_party_import_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        dep for extra in project.get("optional-dependencies", {}).values() for dep in extra]
    declared = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
                for dep in requirements}
    # import name -> distribution name where they differ
    distribution = {"yaml": "pyyaml", "hydra": "hydra-core", "sklearn": "scikit-learn"}
    import ast

    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in (REPO / "vocoder").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in stdlib or top == "vocoder" or top == "__future__":
                    continue
                name = distribution.get(top, top).lower()
                if name not in declared:
                    missing.add(f"{top} ({path.relative_to(REPO)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
