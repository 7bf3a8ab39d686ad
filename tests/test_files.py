import os
import stat

import pytest

from pipeline.errors import DiskFullError
from pipeline.files import atomic_path, remove_partial, write_json


@pytest.fixture(params=[0o022, 0o002, 0o027], ids=["umask022", "umask002", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_atomic_file_gets_the_permissions_the_umask_allows_not_a_temp_files(tmp_path, umask):
    write_json(tmp_path / "out" / "m.json", {"a": 1})
    assert (tmp_path / "out" / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert mode(tmp_path / "out" / "m.json") == 0o666 & ~umask  # mkstemp alone would leave 0600


def test_an_atomic_folder_and_its_files_get_the_umasks_permissions(tmp_path, umask):
    with atomic_path(tmp_path / "models", folder=True) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "n.txt").write_text("y")
    root = tmp_path / "models"
    assert mode(root) == mode(root / "sub") == 0o777 & ~umask  # mkdtemp alone would leave 0700
    assert mode(root / "w.bin") == mode(root / "sub" / "n.txt") == 0o666 & ~umask


def test_an_atomic_folder_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "stale.bin").write_bytes(b"old")
    with atomic_path(tmp_path / "models", folder=True) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temporary or old folder left


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_failed_write_leaves_the_old_version_and_no_temporary(tmp_path, folder):
    final = tmp_path / "thing"
    if folder:
        final.mkdir()
        (final / "keep").write_text("old")
    else:
        final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final, folder=folder) as tmp:
        (tmp / "half" if folder else tmp).write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "keep" if folder else final).read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_what_a_kill_left_is_removed_and_nothing_else(tmp_path):
    (tmp_path / ".tmp-step-00000007-x").mkdir()
    (tmp_path / ".tmp-m.json-y").write_text("half")
    (tmp_path / "step-00000003").mkdir()
    remove_partial(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def test_a_write_still_in_progress_in_another_process_is_left_alone(tmp_path):
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".tmp-{writer.pid}-m.json-abc").write_text("being written")
        remove_partial(tmp_path)
        assert (tmp_path / f".tmp-{writer.pid}-m.json-abc").exists()
    finally:
        writer.kill()
        writer.wait()
    remove_partial(tmp_path)  # its writer is gone now
    assert not list(tmp_path.iterdir())


@pytest.fixture
def small_disk(tmpfs):
    """A 1 MiB filesystem."""
    return tmpfs("1m")


def test_a_full_disk_is_one_line_naming_the_path_and_the_old_file_is_kept(small_disk):
    write_json(small_disk / "metrics.json", {"accuracy": 0.9})
    with pytest.raises(DiskFullError, match=r"^no space left on device writing .*metrics\.json \(\d+\.\d MiB free in "):
        write_json(small_disk / "metrics.json", {"rows": ["x" * 100] * 20_000})  # 2 MB
    assert (small_disk / "metrics.json").read_text() == '{\n  "accuracy": 0.9\n}\n'
    assert [p.name for p in small_disk.iterdir()] == ["metrics.json"]  # no temporary left


def test_a_checkpoint_that_does_not_fit_is_one_line_not_a_torch_traceback(small_disk):
    import torch

    from pipeline.checkpoint import Checkpoint, TrainState, save_checkpoint

    weights = {"w": torch.zeros(300_000)}  # 1.2 MB: does not fit
    optimizer = {"state": {0: {"exp_avg": torch.zeros(100_000)}}, "param_groups": [{"lr": 0.1}]}
    with pytest.raises(DiskFullError) as caught:
        state = TrainState(fingerprint="f")
        ckpt = Checkpoint(None, state, weights, weights, optimizer, {}, torch.get_rng_state())
        save_checkpoint(small_disk, ckpt, keep=2)
    line = str(caught.value)  # needs: model + best + optimizer; free: the whole 1 MiB, the partial write gone
    assert line.startswith(f"no space left on device writing {small_disk}/step-00000000 (it needs about 2.7 MiB, ")
    assert f" 1.0 MiB free in {small_disk}); free space there" in line
    assert not list(small_disk.iterdir())
