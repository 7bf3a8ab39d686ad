import subprocess
import sys

import pytest
import torch

from pipeline.dataset import CLASSES, Split, load_split, parse_idx, train_val_split
from pipeline.errors import DataError
from tests.conftest import idx_bytes, synthetic_split


def test_parse_idx_round_trips_shape_and_bytes():
    t = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    assert torch.equal(parse_idx(idx_bytes(t)), t)


def test_parse_idx_reads_one_dimensional_labels():
    t = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    assert torch.equal(parse_idx(idx_bytes(t)), t)


@pytest.mark.parametrize(
    ("buf", "match"),
    [
        (b"\x01\x02\x08\x01", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd", r"element type 0x0d"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated inside its IDX header"),
        (
            idx_bytes(torch.zeros(4, 2, 2, dtype=torch.uint8))[:-3],
            r"holds 13 data bytes but its header \(4, 2, 2\) needs 16",
        ),
        (idx_bytes(torch.zeros(4, dtype=torch.uint8)) + b"x", r"holds 5 data bytes"),
    ],
    ids=["bad-magic", "float-type", "short-header", "truncated-data", "trailing-bytes"],
)
def test_parse_idx_rejects_malformed_files(buf, match):
    with pytest.raises(DataError, match=match):
        parse_idx(buf)


def test_load_split_reads_synthetic_files_and_applies_subset(tiny_raw):
    train = load_split(tiny_raw, "train")
    assert train.images.shape == (240, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    images, labels = synthetic_split(240, 0)
    assert torch.equal(train.images, images) and torch.equal(train.labels, labels.long())
    first = load_split(tiny_raw, "test", subset=25)
    assert len(first) == 25
    assert torch.equal(first.labels, load_split(tiny_raw, "test").labels[:25])


def test_load_split_missing_file_says_to_run_download(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is missing; run `dvc repro download`"):
        load_split(tmp_path, "train")


def test_load_split_rejects_mismatched_images_and_labels(tiny_raw):
    (tiny_raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(5, dtype=torch.uint8)))
    with pytest.raises(DataError, match="do not match"):
        load_split(tiny_raw, "test")


def test_train_val_split_is_disjoint_complete_and_seeded(tiny_raw):
    full = load_split(tiny_raw, "train")
    full = Split(full.images, torch.arange(len(full)))  # labels as sample ids
    train, val = train_val_split(full, 40, seed=3)
    assert len(train) == 200 and len(val) == 40
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(240))
    again_train, again_val = train_val_split(full, 40, seed=3)
    assert torch.equal(val.labels, again_val.labels)
    _, other_val = train_val_split(full, 40, seed=4)
    assert not torch.equal(val.labels, other_val.labels)


@pytest.mark.parametrize("val_size", [240, 500])
def test_val_size_not_below_training_size_is_refused(tiny_raw, val_size):
    full = load_split(tiny_raw, "train")
    with pytest.raises(DataError, match=rf"data.val_size \({val_size}\) must be .* less than the 240 training samples"):
        train_val_split(full, val_size, seed=0)


def test_class_names_are_the_ten_fashion_mnist_labels_in_order():
    assert len(CLASSES) == 10 and CLASSES[0] == "T-shirt/top" and CLASSES[9] == "Ankle boot"


def test_download_stage_imports_no_torch():
    code = "import sys, pipeline.download; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
