from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import Params, assignment, load_params, parse_params, save_params, training_params, with_changes

REPO = Path(__file__).resolve().parents[1]


def over_params_yaml(raw):
    """``raw``'s sections laid over params.yaml's, key by key (anything else as it is), so that one bad value
    is all that is wrong."""
    if not isinstance(raw, dict):
        return raw
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in raw.items():
        both = isinstance(values, dict) and isinstance(full.get(section), dict)
        full[section] = {**full[section], **values} if both else values
    return full


def test_repo_params_file_loads_with_documented_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.model.name == "tutorial_cnn"
    assert params.download.sources[0] == "/usr/share/datasets/fashion-mnist"
    assert params.train.batch_size >= 1 and params.train.lr > 0


def test_the_schema_holds_no_values_so_params_yaml_is_the_one_place_for_them():
    with pytest.raises(ParamsError, match=r"^data is missing; params\.yaml must set every key"):
        parse_params({})
    with pytest.raises(TypeError):
        Params()  # type: ignore[call-arg]  # no defaults in code: tests build params from params.yaml too


def test_exponent_floats_parse_as_numbers(tmp_path):
    # DVC's `-S train.lr=3e-3` writes YAML 1.2 floats that plain PyYAML reads as strings
    path = tmp_path / "p.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("lr: 0.002 ", "lr: 3e-3 "))
    assert load_params(path).train.lr == pytest.approx(0.003)


def test_a_params_file_that_lacks_keys_is_refused_naming_them(tmp_path):
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    del full["train"]["keep_runs"], full["evaluate"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full))
    lacks = r"lacks train\.keep_runs, evaluate\.batch_size, evaluate\.tta: a params file must set every key"
    with pytest.raises(ParamsError, match=lacks):
        load_params(path)


def test_a_recipe_passed_as_params_is_refused_with_the_exp_run_line_to_use():
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "recipes" / "fast.yaml")
    message = str(info.value)
    assert "recipes/fast.yaml lacks data.subset, data.split_seed, download.sources, download.timeout and" in message
    assert message.endswith(
        "lay them over params.yaml: dvc exp run -n fast -S data.val_size=1000 -S model.name=quick_cnn "
        "-S train.epochs=1 -S train.lr=0.01 -S train.label_smoothing=0.1 -S train.mixed_precision=bf16 "
        "-S train.schedule=triangular -S train.bn_bias_lr_scale=8.0 -S train.whiten_init=true -S evaluate.tta=flip"
    )
    assert "\n" not in message


def test_training_params_leave_out_the_bookkeeping_knobs():
    shaping = training_params(load_params(REPO / "params.yaml"))
    assert shaping["train.lr"] == 0.002 and shaping["train.mixed_precision"] == "fp32"
    assert shaping["data.val_size"] == 6000 and shaping["model.name"] == "tutorial_cnn"
    for knob in ("eval_batch_size", "checkpoint_every_steps", "keep_checkpoints", "keep_runs"):
        assert f"train.{knob}" not in shaping
    assert not any(k.startswith(("download.", "evaluate.")) for k in shaping)


def test_integer_is_accepted_for_a_float_key():
    assert parse_params(over_params_yaml({"train": {"lr": 1}})).train.lr == 1.0


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"trian": {}}, r"unknown key trian; allowed keys: data, download, evaluate, export, model, train"),
        ({"train": {"learning_rate": 0.1}}, r"unknown key train\.learning_rate; allowed keys in train: .*lr"),
        ({"train": {"epochs": "ten"}}, r"train\.epochs must be an integer, got 'ten'"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs must be an integer"),
        ({"train": {"epochs": True}}, r"train\.epochs must be an integer"),
        ({"train": {"lr": "fast"}}, r"train\.lr must be a number, got 'fast'"),
        ({"train": {"hflip": "yes"}}, r"train\.hflip must be true or false"),
        ({"train": "oops"}, r"train must be a mapping"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be >= 1, got 0"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size must be >= 1, got 0"),
        ({"train": {"lr": 0}}, r"train\.lr must be > 0, got 0"),
        ({"train": {"lr": -0.1}}, r"train\.lr must be > 0"),
        (
            {"train": {"schedule": "cosine"}},
            r"train\.schedule 'cosine' is unknown; allowed: onecycle, triangular, constant",
        ),
        (
            {"model": {"name": "resnet"}},
            (r"model\.name 'resnet' is unknown; allowed: tutorial_cnn, bn_cnn, resnet9, quick_cnn, quick_resnet9"),
        ),
        ({"train": {"translate": 9}}, r"train\.translate must be 0 \(off\) to 8 pixels, got 9"),
        ({"train": {"cutout": -1}}, r"train\.cutout must be 0 \(off\) to 28 pixels, got -1"),
        ({"train": {"label_smoothing": 1.0}}, r"train\.label_smoothing must be in \[0, 1\), got 1\.0"),
        ({"train": {"mixed_precision": "no"}}, r"train\.mixed_precision 'no' is unknown; allowed: fp32, bf16, fp16"),
        ({"train": {"optimizer_impl": "apex"}}, r"train\.optimizer_impl 'apex' is unknown; allowed: auto, for_loop"),
        ({"train": {"compile": "yes"}}, r"train\.compile must be true or false, got 'yes'"),
        ({"data": {"subset": -1}}, r"data\.subset must be 0 \(all\) or a positive count"),
        ({"data": {"val_size": 0}}, r"data\.val_size must be >= 1"),
        ({"download": {"sources": []}}, r"download\.sources must be a non-empty list"),
        ({"download": {"sources": [3]}}, r"download\.sources\[0\] must be a string"),
        ({"download": {"timeout": float("inf")}}, r"download\.timeout must be a finite number, got inf"),
        ({"train": {"lr": float("nan")}}, r"train\.lr must be a finite number, got nan"),
        ({"train": {"seed": -1}}, r"train\.seed must be 0 to 4294967295, got -1"),
        ({"train": {"seed": 2**70}}, r"train\.seed must be 0 to 4294967295, got 1180591620717411303424"),
        ({"data": {"split_seed": 2**32}}, r"data\.split_seed must be 0 to 4294967295"),
        ({"export": {"max_logit_diff": 0}}, r"export\.max_logit_diff must be in \(0, 1\], got 0"),
        ({"export": {"max_logit_diff": "1e-4"}}, r"export\.max_logit_diff must be a number, got '1e-4'"),
        (["train"], r"a params file must be a mapping of keys to values, got \['train'\]"),
    ],
    ids=[
        "unknown-section",
        "unknown-key",
        "str-for-int",
        "float-for-int",
        "bool-for-int",
        "str-for-float",
        "str-for-bool",
        "section-not-mapping",
        "epochs-zero",
        "batch-zero",
        "lr-zero",
        "lr-negative",
        "unknown-schedule",
        "unknown-model",
        "translate-too-far",
        "cutout-negative",
        "label-smoothing-one",
        "unknown-precision",
        "unknown-optimizer-impl",
        "compile-not-bool",
        "negative-subset",
        "val-size-zero",
        "no-sources",
        "source-not-string",
        "infinite-timeout",
        "nan-lr",
        "negative-seed",
        "seed-too-large",
        "split-seed-too-large",
        "logit-bound-zero",
        "logit-bound-string",
        "top-level-list",
    ],
)
def test_bad_params_raise_one_line_naming_the_key(raw, match):
    with pytest.raises(ParamsError, match=match) as info:
        parse_params(over_params_yaml(raw))
    assert "\n" not in str(info.value)


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="not found; run from the project root"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(path)


def test_overrides_lay_a_recipe_over_params_without_touching_the_original():
    from pipeline.params import with_overrides

    raw = {"train": {"epochs": 10, "lr": 0.002}, "model": {"name": "tutorial_cnn"}}
    merged = with_overrides(raw, {"train": {"epochs": 7}})
    assert merged == {"train": {"epochs": 7, "lr": 0.002}, "model": {"name": "tutorial_cnn"}}
    assert raw["train"]["epochs"] == 10  # a new mapping, the base is left as it was
    assert with_overrides(raw, None) == raw
    with pytest.raises(ParamsError, match="'trian' is not a params section; allowed: train, model"):
        with_overrides(raw, {"trian": {"epochs": 7}})


def test_layers_are_laid_over_a_complete_file_and_checked_as_a_whole():
    params = load_params(REPO / "params.yaml", {"train": {"epochs": 3}}, assignment("train.lr=3e-3"))
    assert params.train.epochs == 3 and params.train.lr == pytest.approx(0.003)
    with pytest.raises(ParamsError, match=r"train\.epochs must be >= 1, got 0"):
        load_params(REPO / "params.yaml", assignment("train.epochs=0"))


@pytest.mark.parametrize("text", ["epochs=3", "train.epochs", ".epochs=3", "train.=3"])
def test_an_assignment_that_is_not_section_key_value_is_refused(text):
    with pytest.raises(ParamsError, match=r"is not SECTION\.KEY=VALUE \(e\.g\. train\.epochs=5\)"):
        assignment(text)


def test_saved_params_are_a_complete_file_that_reads_back_the_same(tmp_path):
    params = with_changes(load_params(REPO / "params.yaml"), {"model": {"name": "bn_cnn"}, "train": {"cutout": 4}})
    save_params(params, tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml") == params


def test_a_params_path_that_is_a_folder_or_not_text_gives_one_line(tmp_path):
    with pytest.raises(ParamsError, match=r"params file .* cannot be read \(Is a directory\)"):
        load_params(tmp_path)
    binary = tmp_path / "params.yaml"
    binary.write_bytes(b"train:\n  lr: \xff\xfe\n")
    with pytest.raises(ParamsError, match=r"params.yaml is not UTF-8 text; a params file is YAML"):
        load_params(binary)


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:4:1 is not valid YAML: expected ',' or '\]'"):
        load_params(path)


def test_under_dvc_a_params_error_names_the_value_the_last_good_run_had(tmp_path):
    from pipeline.params import last_good_hint

    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "download": {"params": {"params.yaml": {"download": {"timeout": 30}}}},
        "train": {"params": {"params.yaml": {"data.subset": 0, "train": {"lr": 0.002, "epochs": 10}}}},
    }}))  # fmt: skip
    now = {"download": {"timeout": 60}, "data": {"subset": 0}, "train": {"lr": -1, "epochs": 10}}
    said = "train.lr must be > 0, got -1.0"
    assert (
        last_good_hint(now, True, said, lock)
        == "; the last good run (dvc.lock) had train.lr=0.002: set it back in params.yaml"
    )
    assert last_good_hint(now, True, "another error", lock).endswith(
        "had download.timeout=30, train.lr=0.002: set it back in params.yaml"
    )
    assert last_good_hint(now, False, said, lock) == ""  # not under DVC
    assert last_good_hint(now, True, said, tmp_path / "none.lock") == ""  # no last good run
