"""The project as a user installs it: one import namespace, a wheel that works outside the repository.

pyproject.toml maps the repository's folders (core/, configs/, data/, training/, vae/, diffusion/, pipelines/) onto
one package, ``dora_shapegen``. These tests check that no code imports the folders by their own names (which works
only from the repository root), and that a wheel, installed into a fresh virtual environment, adds nothing to
site-packages but ``dora_shapegen`` and runs the `dora` command and a tiny chain from an unrelated folder with the
shipped configs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# repository folder -> import name (as pyproject.toml's package-dir says)
MAPPING = {
    "core": "dora_shapegen",
    "configs": "dora_shapegen.configs",
    "data": "dora_shapegen.data",
    "training": "dora_shapegen.training",
    "vae": "dora_shapegen.vae",
    "diffusion": "dora_shapegen.diffusion",
    "pipelines": "dora_shapegen.pipelines",
}


def _python_files() -> list[Path]:
    folders = [ROOT / name for name in MAPPING] + [ROOT / "tests"]
    return sorted(
        path for folder in folders for path in folder.rglob("*.py") if "__pycache__" not in path.parts
    )


def test_code_imports_the_folders_only_through_the_namespace():
    """`import vae` works from the repository root only (the folder is on sys.path there), never when installed."""
    bare = set(MAPPING)
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in bare
            ]
    assert not found, "imports by folder name instead of dora_shapegen.*:\n" + "\n".join(found)


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (no build/ folder left in the repository), offline."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in MAPPING:
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    done = subprocess.run(
        [*command, "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (work / "build.log").write_text(done.stdout + done.stderr)  # read by test_the_build_warns_of_nothing
    (built,) = (work / "dist").glob("dora_shapegen-*.whl")
    return built


def test_the_build_warns_of_nothing(wheel):
    """setuptools warns about what pyproject.toml leaves ambiguous or deprecated (a configs/ folder missing from
    `packages`, the license as a table); the build of the wheel prints no warning."""
    log = (wheel.parent.parent / "build.log").read_text()
    assert "Warning" not in log, log[-3000:]


def test_wheel_holds_every_module_and_config_under_one_name(wheel):
    files = _wheel_files(wheel)
    assert {name.split("/")[0] for name in files} == {
        "dora_shapegen",
        wheel.name.rsplit("-", 3)[0] + ".dist-info",
    }
    expected = set()
    for folder, package in MAPPING.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".jsonl"} and "__pycache__" not in path.parts:
                expected.add("/".join([*package.split("."), *path.relative_to(ROOT / folder).parts]))
    missing = sorted(expected - files)
    assert not missing, f"the wheel lacks {missing} (a new subpackage must be listed in pyproject's packages)"
    entry_points = next(name for name in files if name.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "dora = dora_shapegen.pipelines.apps.cli:main" in archive.read(entry_points).decode()


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    )


def _fresh_env_with_our_dependencies(folder: Path) -> Path:
    """A new virtual environment that sees this environment's packages (torch & co.) but not dora_shapegen.

    Installing the dependencies again would take minutes and a network; instead a folder of links to every entry
    of this environment's site-packages except our own editable install is added as a site directory.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True, timeout=120
    )
    python = folder / "venv" / "bin" / "python"
    ours = ("dora_shapegen", "__editable__", "__pycache__")
    deps = folder / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(ours):
            (deps / entry.name).symlink_to(entry)
    (_site_packages(python) / "_dependencies.pth").write_text(
        f"import site; site.addsitedir({str(deps)!r})\n"
    )
    return python


def test_wheel_installed_elsewhere_runs_the_cli_and_a_tiny_chain(wheel, tmp_path):
    python = _fresh_env_with_our_dependencies(tmp_path)
    site_packages = _site_packages(python)
    before = set(os.listdir(site_packages))
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    added = set(os.listdir(site_packages)) - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"dora_shapegen"}, added
    assert [name for name in added if name.endswith(".dist-info")] == [
        wheel.name.rsplit("-", 3)[0] + ".dist-info"
    ]

    work = tmp_path / "elsewhere"  # no configs/ or package folders here: everything comes from the install
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    dora = python.parent / "dora"

    def run(*args: str, program: Path = dora) -> str:
        done = subprocess.run(
            [str(program), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    located = run("-c", "import dora_shapegen, importlib.util as u; print(dora_shapegen.__file__, u.find_spec('vae'))",
                  program=python)  # fmt: skip
    assert located.split()[0].startswith(str(site_packages)) and located.split()[1] == "None"
    assert "train-vae" in run("--help")

    # The first failure: the quickstart's default configs come from the installed package.
    run("quickstart", "--out", "qs", "--stop-after", "build-dataset", "--num-shapes", "2")
    assert (work / "qs" / "dataset" / "index.jsonl").exists()

    # A tiny chain, each config named as in the repository (configs/...) and found among the shipped ones, or
    # given as a file of the user's own.
    run("build-dataset", "--out", "dataset", "--num-shapes", "4", "--seed", "0")
    tiny_prepare = ["--epsilon", "0.03125", "--n-uniform", "256", "--n-salient", "128", "--n-volume", "512"]
    tiny_prepare += ["--n-near", "256", "--n-sharp", "128", "--workers", "1"]
    run(
        "prepare",
        "dataset/index.jsonl",
        "--out",
        "prepared",
        "--config",
        "configs/quickstart/prepare.yaml",
        *tiny_prepare,
    )
    run(
        "train-vae",
        "--config",
        "configs/vae/tiny.yaml",
        "--data",
        "prepared",
        "--output-dir",
        "vae",
        "--max-steps",
        "2",
    )
    run("cache-latents", "--vae", "vae/final", "--data", "prepared", "--out", "latents", "--num-tokens", "32",
        "--config", "configs/quickstart/cache.yaml")  # fmt: skip
    dit = yaml.safe_load((ROOT / "configs" / "dit" / "tiny.yaml").read_text())
    dit["model"]["in_channels"] = yaml.safe_load((ROOT / "configs" / "vae" / "tiny.yaml").read_text())[
        "model"
    ]["latent_channels"]
    dit["sampling"]["final"] = False
    (work / "dit.yaml").write_text(yaml.safe_dump(dit))
    run(
        "train-dit",
        "--config",
        "dit.yaml",
        "--shards",
        "latents",
        "--vae",
        "vae/final",
        "--output-dir",
        "dit",
    )
    run("assemble-pipeline", "--vae", "vae/final", "--transformer", "dit/final", "--manifest",
        "latents/manifest.json", "--out", "pipeline")  # fmt: skip
    run(
        "generate",
        "a chair",
        "--pipeline",
        "pipeline",
        "-o",
        "chair.glb",
        "--steps",
        "2",
        "--resolution",
        "24",
    )
    assert (work / "chair.glb").stat().st_size > 0
