"""The packaged data: every file matches MANIFEST.sha256, tampering is caught, and the
manifest agrees with the source copy in ../shared/data when that is present. Also the
atomic writers: concurrent writers of one path and a failed write leave no debris."""

from __future__ import annotations

import lzma
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from editkit import resources

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _manifest_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_every_packaged_file_matches_its_digest() -> None:
    files = resources.list_files()
    assert len(files) > 200
    for rel in files:
        resources.read_bytes(rel)  # raises ChecksumError on a mismatch


def test_every_stored_file_is_in_the_manifest() -> None:
    root = resources.data_root()
    stored = {p.relative_to(root).as_posix().removesuffix(".xz") for p in root.rglob("*") if p.is_file()}
    assert stored - {"MANIFEST.sha256", "README.md"} == set(resources.list_files())


def test_list_files_and_unknown_path() -> None:
    assert resources.list_files("zsre/") == [
        "zsre/LICENSE_ROME",
        "zsre/zsre_mend_eval.first1000.json",
        "zsre/zsre_mend_train-1k.json",
    ]
    with pytest.raises(FileNotFoundError, match="not packaged"):
        resources.read_bytes("counterfact/counterfact.json")


@pytest.fixture
def data_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A writable copy of editkit/data that resources reads instead of the real one."""
    copy = tmp_path / "data"
    shutil.copytree(resources.data_root(), copy)
    monkeypatch.setattr(resources, "data_root", lambda: copy)
    resources._manifest.cache_clear()  # the manifest is cached per process
    yield copy
    resources._manifest.cache_clear()


def test_tampered_compressed_file_raises(data_copy: Path) -> None:
    rel = "zsre/zsre_mend_train-1k.json"
    stored = data_copy / f"{rel}.xz"
    data = lzma.decompress(stored.read_bytes())
    assert resources.read_bytes(rel) == data
    stored.write_bytes(lzma.compress(data.replace(b"UniFirst", b"UniFirsT", 1)))
    with pytest.raises(resources.ChecksumError, match=rel):
        resources.read_text(rel)


def test_tampered_plain_file_raises(data_copy: Path) -> None:
    rel = "zsre/LICENSE_ROME"
    (data_copy / rel).write_text((data_copy / rel).read_text() + "\n")
    with pytest.raises(resources.ChecksumError):
        resources.read_bytes(rel)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_manifest_matches_source_manifest() -> None:
    source = _manifest_lines(SHARED_DATA / "MANIFEST.sha256")
    # toxigen/statements.jsonl is derived by scripts/package_data.py (its own test rebuilds
    # it), and of ToxiGen's source files only LICENSE.txt is copied as it is.
    # heldout/ (the health alarm's text) comes from a PyPI archive, not from shared/data:
    # scripts/package_heldout.py rebuilds it and tests/test_health.py checks its digest.
    derived = {"toxigen/statements.jsonl"}
    packaged = [line for line in _manifest_lines(resources.data_root() / "MANIFEST.sha256")
                if line.split(maxsplit=1)[1] not in derived and not line.split(maxsplit=1)[1].startswith("heldout/")]
    assert set(packaged) <= set(source)
    packaged = [line for line in packaged if not line.split(maxsplit=1)[1].startswith("toxigen/")]
    datasets = {line.split(maxsplit=1)[1].split("/", 1)[0] for line in packaged}
    assert sorted(packaged) == sorted(line for line in source if line.split(maxsplit=1)[1].split("/", 1)[0] in datasets)


def test_concurrent_atomic_writes_of_one_path(tmp_path: Path) -> None:
    """Two writers of one file never collide on a temporary name; the file is always whole."""
    path = tmp_path / "meta.json"
    texts = ["a" * 200_000, "b" * 150_000]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(texts))

    def write(text: str) -> None:
        barrier.wait()
        try:
            for _ in range(200):
                resources.atomic_write_text(path, text)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary file left


def test_failed_atomic_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with pytest.raises((AttributeError, pickle.PicklingError)):  # the type differs between Python versions
        resources.atomic_torch_save(lambda: None, path)  # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []
