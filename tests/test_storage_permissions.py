"""The archive holds patient data and password hashes: only its owner may read it."""
from __future__ import annotations

import stat

from storage import Archive, Source
from tests import corpus


def test_archive_folder_index_and_blobs_are_owner_only(tmp_path):
    archive = Archive(tmp_path / "data")
    try:
        [path] = corpus.save(corpus.ct_series(1), tmp_path / "src")
        archive.store_file(path, Source("import", "test"))
        [stored] = archive.instances()
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "data" / "index.sqlite").stat().st_mode) == 0o600
        assert stat.S_IMODE(archive.instance_path(stored).stat().st_mode) == 0o600
    finally:
        archive.close()
