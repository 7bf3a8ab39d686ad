import pytest
import torch

from pipeline.dataset import CLASSES
from pipeline.metrics import classification_report, confusion_matrix


def test_confusion_matrix_counts_rows_as_truth_and_columns_as_prediction():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_report_gives_per_class_accuracy_keyed_by_name():
    labels = torch.arange(10).repeat_interleave(4)  # 4 samples per class
    preds = labels.clone()
    preds[:3] = 5  # three T-shirts called Sandal
    report = classification_report(confusion_matrix(preds, labels, 10), CLASSES)
    assert report["samples"] == 40
    assert report["accuracy"] == pytest.approx(37 / 40)
    assert list(report["per_class_accuracy"]) == list(CLASSES)
    assert report["per_class_accuracy"]["T-shirt/top"] == 0.25
    assert report["per_class_accuracy"]["Sandal"] == 1.0
    assert set(report["per_class_support"].values()) == {4}


def test_report_counts_every_sample_not_four_per_batch():
    # the seed tutorial's `for i in range(4)` counted 4 samples per batch
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    preds = torch.randint(0, 10, (1000,), generator=g)
    report = classification_report(confusion_matrix(preds, labels, 10), CLASSES)
    assert report["samples"] == 1000
    assert list(report["per_class_support"].values()) == torch.bincount(labels, minlength=10).tolist()
    assert report["accuracy"] == pytest.approx((preds == labels).float().mean().item())


def test_class_with_no_samples_reports_zero_not_nan():
    report = classification_report(confusion_matrix(torch.tensor([1]), torch.tensor([1]), 3), ["a", "b", "c"])
    assert report["per_class_accuracy"] == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([1, 2]), torch.tensor([1]), 3)
