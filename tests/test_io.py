"""bclib._io.write_atomically: whole files or none, the usual permissions, long names."""
import os
import stat

import pytest

from bclib._io import write_atomically


def write_text(text):
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)
    return write


@pytest.mark.parametrize("name", ["m" * 246 + ".bcz", "模" * 81 + ".bcz"])  # 250 bytes, 247 bytes in 85 characters
def test_a_legal_long_name_is_written(tmp_path, name):
    path = tmp_path / name  # most file systems allow 255 bytes
    write_atomically(path, write_text("contents"))
    assert path.read_text() == "contents" and os.listdir(tmp_path) == [path.name]


def test_permissions_follow_the_umask_without_changing_it(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        def no_umask(mask):  # setting the umask, even back, races with other threads' file creation
            raise AssertionError("write_atomically set the umask")
        monkeypatch.setattr(os, "umask", no_umask)
        write_atomically(tmp_path / "file", write_text("x"))
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "file").st_mode) == 0o640  # 0666 less 027


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "file"
    path.write_text("old")

    def failing(temporary):
        write_text("half")(temporary)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(path, failing)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["file"]
