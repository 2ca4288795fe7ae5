"""Packaged data: every file in fisao_jax/resources/ is package data (pyproject's globs), named in
`fisao_jax.packaged` and in the NOTICE, and readable through importlib.resources."""
import gzip
import importlib.resources
import json
import pathlib

import pytest
from setuptools.config.pyprojecttoml import read_configuration

from fisao_jax import packaged
from fisao_jax.rewards import entities

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "fisao_jax"


def _resource_files() -> set[str]:
    folder = PACKAGE_DIR / "resources"
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_every_resource_file_is_package_data():
    globs = read_configuration(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]["fisao_jax"]
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
