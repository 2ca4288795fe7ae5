"""Packaged data: every file in fisao_jax/resources/ is package data (pyproject's globs, and in a
built wheel), named in `fisao_jax.packaged` and in the NOTICE, and readable through
importlib.resources."""
import gzip
import importlib.resources
import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from fisao_jax import packaged
from fisao_jax.rewards import entities

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "fisao_jax"


def _resource_files() -> set[str]:
    folder = PACKAGE_DIR / "resources"
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _package_data_globs() -> list[str]:
    path = REPO_ROOT / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: setuptools' own TOML reader
        from setuptools.config.pyprojecttoml import read_configuration
        config = read_configuration(path)
    else:
        config = tomllib.loads(path.read_text())
    return config["tool"]["setuptools"]["package-data"]["fisao_jax"]


def test_every_resource_file_is_package_data():
    globs = _package_data_globs()
    # setuptools expands package-data globs relative to the package folder, files only
    covered = {p.relative_to(PACKAGE_DIR / "resources").as_posix()
               for g in globs for p in PACKAGE_DIR.glob(g) if p.is_file()}
    assert _resource_files() == covered


def test_every_resource_file_is_named_in_packaged_and_in_the_notice():
    assert set(packaged.ALL) == _resource_files()
    notice = packaged.path(packaged.NOTICE).read_text()
    for name in packaged.ALL:
        if name != packaged.NOTICE:
            assert pathlib.PurePosixPath(name).name in notice, name
    assert packaged.ENTITY_VOCAB == entities.DEFAULT_VOCAB_RESOURCE


@pytest.mark.parametrize("name", packaged.ALL)
def test_readable_through_importlib_resources(name):
    data = importlib.resources.files("fisao_jax").joinpath("resources").joinpath(name).read_bytes()
    assert data == packaged.path(name).read_bytes() and data
    if name.endswith(".gz"):
        json.loads(gzip.decompress(data))
    elif name.endswith(".json") and not name.startswith("pope/"):  # POPE files are JSON Lines
        json.loads(data)


def test_contents():
    assert len(json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text())) == 80
    assert len(json.loads(packaged.path(packaged.LVIS_CATEGORIES).read_text())) == 1203
    assert len(packaged.path(packaged.CHAIR_SYNONYMS).read_text().splitlines()) == 80
    for split in packaged.POPE_SPLITS:
        lines = packaged.path(packaged.pope_coco(split)).read_text().splitlines()
        assert len(lines) == 3000 and {"question_id", "image", "text", "label"} <= set(json.loads(lines[0]))


def test_unknown_names_are_clear_errors():
    with pytest.raises(FileNotFoundError, match="fisao_jax/resources/chair/nope.txt"):
        packaged.path("chair/nope.txt")
    with pytest.raises(ValueError, match="unknown POPE split 'easy'"):
        packaged.pope_coco("easy")


def test_wheel_carries_the_resources(tmp_path):  # about 5 s
    pytest.importorskip("setuptools")  # the build backend, used without an isolated (networked) build env
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(PACKAGE_DIR, src / "fisao_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("fisao_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fisao_jax/resources/{name}" for name in packaged.ALL} <= names
    assert "fisao_jax/packaged.py" in names
