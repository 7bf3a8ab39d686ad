import json
import re

import pytest
import torch
from PIL import Image

from pipeline.batches import to_input
from pipeline.dataset import CLASSES, load_split
from pipeline.model import CONFIG_FILE, ModelConfig, build_model, save_artifact
from scripts import predict


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    save_artifact(model, ModelConfig(), tmp_path / "models")
    return tmp_path / "models", model


def parse(out: str) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for line in out.strip().splitlines():
        name, _, ranked = line.rpartition(": ")
        pairs = [item.rsplit(" ", 1) for item in ranked.split(", ")]
        rows.append((name, [(c, float(p)) for c, p in pairs]))
    return rows


def test_idx_samples_get_top_k_classes_matching_the_model(tiny_raw, artifact, capsys):
    model_dir, model = artifact
    assert (
        predict.main(["--model-dir", str(model_dir), "--data", str(tiny_raw), "--idx", "0", "5", "--top-k", "4"]) == 0
    )
    rows = parse(capsys.readouterr().out)
    test = load_split(tiny_raw, "test")
    with torch.no_grad():
        expected = model(to_input(test.images[[0, 5]])).softmax(1)
    assert [name for name, _ in rows] == [f"test[{i}] (true: {CLASSES[int(test.labels[i])]})" for i in (0, 5)]
    for (_, ranked), probs in zip(rows, expected, strict=True):
        assert len(ranked) == 4
        assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
        assert ranked[0][0] == CLASSES[int(probs.argmax())]
        assert ranked[0][1] == pytest.approx(float(probs.max()), abs=1e-3)


def test_image_files_of_any_size_are_classified(tmp_path, artifact, capsys):
    paths = []
    for i, size in enumerate([(28, 28), (64, 48)]):
        path = tmp_path / f"item{i}.png"
        Image.new("RGB", size, color=(200, 200, 200)).save(path)
        paths.append(str(path))
    predict.main(["--model-dir", str(artifact[0]), *paths])
    rows = parse(capsys.readouterr().out)
    assert [name for name, _ in rows] == paths
    assert all(len(ranked) == 3 and all(c in CLASSES for c, _ in ranked) for _, ranked in rows)


def test_unknown_architecture_is_refused(tmp_path, artifact, tiny_raw, capsys):
    model_dir = artifact[0]
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    meta["model"]["name"] = "mystery_net"
    (model_dir / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as info:
        predict.main(["--model-dir", str(model_dir), "--data", str(tiny_raw), "--idx", "0"])
    assert info.value.code == 2
    assert "names model 'mystery_net', which this version does not know" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--idx", "137"], r"--idx 137 is out of range; the test set has 137 samples"),
        (["not-there.png"], r"image not-there.png does not exist"),
    ],
    ids=["idx-out-of-range", "missing-image"],
)
def test_bad_inputs_get_one_line(tiny_raw, artifact, capsys, args, match):
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), "--data", str(tiny_raw), *args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(match, err)


def test_a_file_that_is_not_an_image_is_reported(tmp_path, artifact, capsys):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), str(path)])
    assert "is not an image PIL can read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("side", "said"), [(7_000, "is 7000x7000"), (20_000, "is over 178 megapixels")], ids=["large", "bomb"]
)
def test_a_huge_image_is_refused_before_decoding(tmp_path, artifact, capsys, side, said):
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path, optimize=True)  # a small file of 49 or 400 megapixels
    with pytest.raises(SystemExit):
        predict.main(["--model-dir", str(artifact[0]), str(path)])
    assert capsys.readouterr().err.strip() == f"error: {path} {said}; images over 40 megapixels are refused"


def test_a_fifo_or_folder_is_refused_instead_of_read(tmp_path, artifact, capsys):
    import os

    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait forever for a writer
    for path in (tmp_path / "pipe.png", tmp_path):
        with pytest.raises(SystemExit):
            predict.main(["--model-dir", str(artifact[0]), str(path)])
        assert capsys.readouterr().err.strip() == f"error: {path} is not a regular file"
