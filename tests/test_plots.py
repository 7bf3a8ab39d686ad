import csv

import pytest
import torch
from PIL import Image

from pipeline.dataset import CLASSES
from pipeline.metrics import Predictions
from pipeline.plots import (
    first_of_each_class,
    label_grid,
    misclassified,
    write_per_class_csv,
    write_predictions_csv,
)


def test_label_grid_lays_out_enlarged_tiles_with_captions():
    images = torch.full((10, 28, 28), 255, dtype=torch.uint8)
    grid = label_grid(images, [f"item {i}" for i in range(10)], cols=4, scale=2)
    assert grid.size == (4 * (28 * 2 + 8), 3 * (28 * 2 + 8 + 12))
    pixels = grid.convert("L")
    assert pixels.getpixel((4 + 10, 2 + 10)) == 255  # inside the first tile: the white image
    caption_box = pixels.crop((4, 2 + 56 + 2, 4 + 60, 2 + 56 + 14))
    assert min(caption_box.tobytes()) < 128  # caption text was drawn


def test_two_line_captions_get_a_taller_cell():
    grid = label_grid(torch.zeros(2, 28, 28, dtype=torch.uint8), ["Coat\n-> Shirt", "Bag"], cols=2, scale=1)
    assert grid.size == (2 * (28 + 8), 28 + 8 + 24)


def test_label_grid_rejects_mismatched_captions():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        label_grid(torch.zeros(3, 28, 28, dtype=torch.uint8), ["a", "b"])


def test_misclassified_picks_wrong_predictions_with_true_to_predicted_captions():
    images = torch.arange(5).view(5, 1, 1).expand(5, 28, 28).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4])
    preds = torch.tensor([0, 9, 2, 5, 4])
    picked, captions = misclassified(images, labels, preds, CLASSES)
    assert picked[:, 0, 0].tolist() == [1, 3]
    assert captions == ["Trouser\n-> Ankle boot", "Dress\n-> Sandal"]


def test_first_of_each_class_orders_by_class():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    assert first_of_each_class(torch.zeros(7, 2, 2), labels, per_class=2).tolist() == [1, 3, 2, 5, 0, 4]


def test_csv_tables_have_one_row_per_sample_and_per_class(tmp_path):
    got = Predictions(preds=torch.tensor([6, 9]), labels=torch.tensor([0, 9]), losses=torch.tensor([2.3, 0.01]),
                      confidence=torch.tensor([0.4, 0.9999996]))  # fmt: skip
    write_predictions_csv(tmp_path / "p.csv", got, CLASSES)
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"index": "0", "actual": "T-shirt/top", "predicted": "Shirt", "probability": "0.400000"},
        {"index": "1", "actual": "Ankle boot", "predicted": "Ankle boot", "probability": "1.000000"},
    ]
    write_per_class_csv(tmp_path / "c.csv", {"Shirt": 0.7, "Bag": 0.98})
    with (tmp_path / "c.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"class": "Shirt", "accuracy": "0.7"},
        {"class": "Bag", "accuracy": "0.98"},
    ]


def test_grid_saves_as_png(tmp_path):
    label_grid(torch.zeros(2, 28, 28, dtype=torch.uint8), ["a", "b"]).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG"
