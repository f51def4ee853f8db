"""ldm.data.image_folder: files named like images that are not images (a FIFO, a PostScript file) are skipped as
unreadable without blocking or running anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.timeout(60)
def test_a_fifo_or_a_postscript_file_in_an_image_folder_is_skipped_without_blocking_or_running_anything(tmp_path, monkeypatch):
    """A FIFO named x.png blocked the data loader's open forever; an EPS file named x.png reached Pillow's EPS plugin,
    which runs Ghostscript.  Both are now unreadable files: skipped with a warning, the good image is used."""
    from PIL import EpsImagePlugin, Image

    from ldm.data.image_folder import ImageFolderDataset

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "b_good.png")
    os.mkfifo(tmp_path / "a_fifo.png")
    (tmp_path / "a_postscript.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    ran: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args) or None)
    dataset = ImageFolderDataset(tmp_path, size=32, split="all", val_fraction=0.0, flip=False)
    assert len(dataset) == 3
    for index in range(3):
        assert dataset[index]["file_path_"] == str(tmp_path / "b_good.png")
    assert sorted(Path(p).name for p in dataset.skipped_files) == ["a_fifo.png", "a_postscript.png"] and ran == []
