"""``launcher/hostfiles.py``: the launcher (root) handles sessions' copies in host memory on
descriptors only, so a user who owns a session folder cannot make it open, move or hand out
anything else by swapping in a link.

Before (issue 20): ``offload_fetch`` checked a path (its owner, ``isfile``) and then opened it again
as root; a user swapped a symlink in between and restored another user's variables, or any file
root reads, into her own session. Here the swap is made before the call: whichever name the user
puts there, the launcher opens nothing through it.
"""

from __future__ import annotations

import os

import pytest

from jupyter_gpu.launcher.hostfiles import COPY, HostFolders, UnsafeCopy

UID, GID = os.getuid(), os.getgid()


@pytest.fixture
def folders():
    f = HostFolders()
    try:
        yield f
    finally:
        f.close()
    assert not os.path.exists(f.base)


def write_copy(folders: HostFolders, name: str, data: bytes = b"variables", mode: int = 0o600):
    path = os.path.join(folders.path(name), COPY)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.fchmod(fd, mode)
    os.close(fd)
    return path


def test_a_copy_moves_reads_and_is_created_on_descriptors(folders):
    a, b = folders.make("L1", UID, GID), folders.make("L2", UID, GID)
    assert os.stat(folders.path(a)).st_mode & 0o777 == 0o700
    write_copy(folders, a)
    moved = folders.move(a, b, UID)
    assert moved == os.path.join(folders.path(b), COPY) and not os.listdir(folders.path(a))
    fd = folders.open_for_reading(b, UID)
    with os.fdopen(fd, "rb") as f:
        assert f.read() == b"variables"
    c = folders.make("L3", UID, GID)
    fd, path = folders.create_for_writing(c, UID, GID)
    os.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o600
    folders.remove(a)
    assert not os.path.exists(folders.path(a))


def test_a_link_in_place_of_the_copy_is_never_followed(folders, tmp_path):
    """The user swaps a symlink to someone else's file in as her copy: it is not read, moved or
    written through."""
    victim = tmp_path / "victims-variables"
    victim.write_bytes(b"bob's weights")
    os.chmod(victim, 0o600)
    a, b = folders.make("L1", UID, GID), folders.make("L2", UID, GID)
    os.symlink(victim, os.path.join(folders.path(a), COPY))
    with pytest.raises(OSError):
        folders.open_for_reading(a, UID)
    with pytest.raises(UnsafeCopy, match="not a plain file"):
        folders.move(a, b, UID)
    os.symlink(victim, os.path.join(folders.path(b), COPY))
    with pytest.raises(OSError):
        folders.create_for_writing(b, UID, GID)
    assert victim.read_bytes() == b"bob's weights"
    folders.remove(a)  # removes the link, never what it names
    assert victim.exists()


def test_a_link_in_place_of_a_session_folder_is_never_followed(folders, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / COPY).write_bytes(b"not hers")
    os.chmod(elsewhere / COPY, 0o600)
    a = folders.make("L1", UID, GID)
    os.rmdir(folders.path(a))
    os.symlink(elsewhere, folders.path(a))
    with pytest.raises(OSError):
        folders.open_for_reading(a, UID)
    for name in ("../x", "..", "a/b", ""):
        with pytest.raises(UnsafeCopy):
            folders.open_for_reading(name, UID)
    folders.remove(a)
    assert (elsewhere / COPY).read_bytes() == b"not hers"


def test_a_copy_others_may_read_or_a_folder_of_another_uid_is_refused(folders):
    a, b = folders.make("L1", UID, GID), folders.make("L2", UID, GID)
    write_copy(folders, a, mode=0o644)
    with pytest.raises(UnsafeCopy, match="read or written by others"):
        folders.open_for_reading(a, UID)
    with pytest.raises(UnsafeCopy, match="read or written by others"):
        folders.move(a, b, UID)
    with pytest.raises(UnsafeCopy, match="not a private folder of uid"):
        folders.open_for_reading(a, UID + 1)


def test_a_spilled_copy_goes_to_the_disk_folder_and_comes_back_on_descriptors(tmp_path):
    """Host memory short: the launcher moves a parked copy to its disk folder (root's, 0700), from
    where a restore takes it back into the next session's folder; a link the user puts in place of
    her copy is not followed."""
    import dask.config

    folders = HostFolders()
    with dask.config.set({"jupyter-gpu.worker.spill-dir": str(tmp_path / "spill")}):
        try:
            a, b = folders.make("L1", UID, GID), folders.make("L2", UID, GID)
            write_copy(folders, a, b"variables" * 1000)
            assert folders.spill(a, UID) == 9000
            assert not os.listdir(folders.path(a))  # out of host memory
            spill_base = folders.spill_base or ""
            assert spill_base.startswith(str(tmp_path / "spill"))
            assert os.stat(spill_base).st_mode & 0o777 == 0o700
            assert os.stat(os.path.join(spill_base, a)).st_mode & 0o777 == 0o600
            assert folders.spill(a, UID) == 0  # spilled already
            with os.fdopen(folders.open_for_reading(a, UID), "rb") as f:
                assert f.read() == b"variables" * 1000
            with pytest.raises(UnsafeCopy, match="belongs to uid"):
                folders.open_for_reading(a, UID + 1)
            moved = folders.move(a, b, UID)  # restored: back into host memory
            with open(moved, "rb") as f:
                assert f.read() == b"variables" * 1000
            assert not os.listdir(spill_base)
            # a link in place of a copy to spill: nothing is read through it
            victim = tmp_path / "victims-variables"
            victim.write_bytes(b"bob's weights")
            os.chmod(victim, 0o600)
            c = folders.make("L3", UID, GID)
            os.symlink(victim, os.path.join(folders.path(c), COPY))
            with pytest.raises(OSError):
                folders.spill(c, UID)
            assert not os.listdir(spill_base) and victim.read_bytes() == b"bob's weights"
            d = folders.make("L4", UID, GID)
            write_copy(folders, d)
            folders.spill(d, UID)
        finally:
            folders.close()
    assert not os.path.exists(folders.base) and not os.path.exists(spill_base)
