import copy

import pytest

from bench.bench_report import markdown, merge_rounds, retarget, summarise


def test_time_to_target_ratios_and_the_seed_loop_that_never_gets_there():
    common = {"samples_per_s": 1000.0, "peak_rss_mb": 500.0}
    seed = {**common, "train_s": 300.0, "curve": [{"train_s": 100.0, "test_accuracy": 0.89},
                                        {"train_s": 300.0, "test_accuracy": 0.905}]}  # fmt: skip
    fast = {**common, "train_s": 20.0, "curve": [{"train_s": 10.0, "test_accuracy": 0.902},
                                       {"train_s": 20.0, "test_accuracy": 0.912}]}  # fmt: skip
    slow = {**common, "train_s": 50.0, "curve": [{"train_s": 50.0, "test_accuracy": 0.85}]}
    results = {"throughput": {}, "accuracy": {"seed": seed, "fast": fast, "slow": slow}, "datapath": {}}
    before = copy.deepcopy(results)
    report = summarise(results, [0.90, 0.91])
    assert results == before  # the measured rows are left as they were
    rows = report["accuracy"]
    assert rows["fast"]["to_target"]["0.900"] == {"train_s": 10.0, "ratio_vs_seed": 30.0, "ratio_is_lower_bound": False}
    # the seed loop never reached 91%: its whole 300 s run bounds its time from below
    assert rows["fast"]["to_target"]["0.910"] == {"train_s": 20.0, "ratio_vs_seed": 15.0, "ratio_is_lower_bound": True}
    assert rows["seed"]["to_target"]["0.910"] == {"train_s": None}
    assert rows["slow"]["to_target"]["0.900"] == {"train_s": None} and rows["slow"]["final_test_accuracy"] == 0.85
    per_seed = {"fast/seed0": fast, "fast/seed1": {**fast, "train_s": 30.0, "curve": [
        {"train_s": 15.0, "test_accuracy": 0.90}, {"train_s": 30.0, "test_accuracy": 0.908}]}}  # fmt: skip
    many = summarise({"throughput": {}, "accuracy": {"seed": seed, **per_seed}, "datapath": {}}, [0.90, 0.91])
    mean = many["accuracy"]["fast (mean)"]
    assert mean["seeds"] == 2 and mean["final_test_accuracy"] == 0.91 and mean["train_s"] == 25.0
    assert mean["to_target"]["0.900"] == {"train_s": 12.5, "ratio_vs_seed": 24.0, "ratio_is_lower_bound": False}
    assert mean["to_target"]["0.910"] == {"train_s": None}  # seed 1 never got there
    table = markdown({**report, "machine": {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2"}})
    assert "| fast | 0.9120 | 20.0 |" in table and "10.0 s (30.0×) | 20.0 s (>15.0×)" in table
    assert "| slow | 0.8500 |" in table and "not reached | not reached" in table


def test_throughput_rounds_give_medians_and_ratios_paired_by_round():
    seed = [{"samples_per_s": r, "peak_rss_mb": 800.0} for r in (2000.0, 1000.0, 2100.0)]
    default = [{"samples_per_s": r, "first_epoch_samples_per_s": f, "peak_rss_mb": m}
               for r, f, m in ((6000.0, 4000.0, 900.0), (3000.0, 2000.0, 950.0), (7350.0, 5000.0, 910.0))]  # fmt: skip
    rows = merge_rounds({"seed": seed, "default": default})
    assert rows["seed"]["ratio_vs_seed"] == 1.0 and rows["seed"]["ratio_vs_seed_range"] == [1.0, 1.0]
    row = rows["default"]
    assert row["samples_per_s"] == 6000.0 and row["samples_per_s_rounds"] == [6000.0, 3000.0, 7350.0]
    # round 2 hit a slow spell on both sides: paired with its own seed run it is still 3.0x, not 1.5x
    assert row["ratio_vs_seed"] == 3.0 and row["ratio_vs_seed_range"] == [3.0, 3.5]
    assert row["first_epoch_samples_per_s"] == 4000.0 and row["peak_rss_mb"] == 950.0
    machine = {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2", "throughput_samples_per_epoch": 20000,
               "seed_loop_threads": 2, "stage_threads": 1}  # fmt: skip
    table = markdown({"throughput": rows, "accuracy": {}, "datapath": {}, "machine": machine})
    assert "cpu (x, 2 CPUs), torch 2; threads: seed loop 2, stage 1" in table
    assert "median of 3 rounds" in table and "| default | 6000 | 3.0 | 3.0-3.5 | 4000 | 950 |" in table


def test_scaling_rows_relate_to_one_process_and_to_the_models_batch_128():
    common = {"processes": 1, "threads": 2, "lr": 0.002, "batch_size": 128}
    rows = {
        "1proc": {**common, "samples_per_s": 6000.0, "model": "tutorial_cnn"},
        "2proc": {**common, "samples_per_s": 4500.0, "model": "tutorial_cnn", "processes": 2,
                  "threads": 1},
        "bn_cnn/b128": {**common, "samples_per_s": 2000.0, "model": "bn_cnn"},
        "bn_cnn/b512": {**common, "samples_per_s": 3000.0, "model": "bn_cnn", "batch_size": 512, "lr": 0.004},
        "tutorial_cnn/b64": {**common, "samples_per_s": 5000.0, "model": "tutorial_cnn", "batch_size": 64},
    }  # fmt: skip
    report = summarise({"throughput": {}, "accuracy": {}, "datapath": {}, "scaling": rows}, [0.9])
    scaling = report["scaling"]
    assert scaling["2proc"]["relative"] == 0.75 and scaling["1proc"]["relative"] == 1.0
    assert scaling["bn_cnn/b512"]["relative"] == 1.5
    assert scaling["tutorial_cnn/b64"]["relative"] is None  # no batch-128 row of its model to compare with
    table = markdown({**report, "machine": {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2"}})
    assert "| tutorial_cnn, 2 process(es) × 1 threads | 128 | 0.002 | 4500 | 0.75 |" in table
    assert "| bn_cnn, 1 process(es) × 2 threads | 512 | 0.004 | 3000 | 1.5 |" in table


def test_a_saved_report_summarised_again_for_other_targets_equals_a_fresh_summary():
    seed = {
        "samples_per_s": 1000.0,
        "peak_rss_mb": 500.0,
        "train_s": 300.0,
        "curve": [{"train_s": 100.0, "test_accuracy": 0.89}, {"train_s": 300.0, "test_accuracy": 0.93}],
    }
    runs = {f"beyond/seed{s}": {**seed, "train_s": 40.0, "curve": [{"train_s": 20.0, "test_accuracy": 0.92 + s / 100},
                                                                  {"train_s": 40.0, "test_accuracy": 0.945}]}
            for s in (0, 1)}  # fmt: skip
    results = {"throughput": {}, "accuracy": {"seed": seed, **runs}, "datapath": {}, "scaling": {}}
    machine = {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2"}
    saved = {**summarise(results, [0.90]), "machine": machine}
    again = retarget(copy.deepcopy(saved), [0.90, 0.93])
    assert again == {**summarise(results, [0.90, 0.93]), "machine": machine}
    # the mean row is remade from the seed rows, not carried over with its old targets
    assert again["accuracy"]["beyond (mean)"]["to_target"]["0.930"] == {
        "train_s": 30.0, "ratio_vs_seed": 10.0, "ratio_is_lower_bound": False}  # fmt: skip
    assert "to 93.0% (× seed)" in markdown(again)


@pytest.mark.parametrize("bad", [[], {"throughput": {}}, {"throughput": {}, "accuracy": {"x": {"train_s": 1.0}},
                                                          "datapath": {}, "machine": {}}])  # fmt: skip
def test_what_is_not_a_saved_report_is_refused_with_what_it_lacks(bad):
    with pytest.raises(ValueError, match="not a benchmark report"):
        retarget(bad, [0.9])


def test_the_paired_ratio_is_the_seed_loops_samples_over_the_recipes_times_the_rounds_speed_ratio():
    # the seed loop: 2 epochs of 100,000 samples at 1,000/s, at 90% after its second. The fast rows ran at a
    # quick moment of the host (10,000/s), while the paired rounds measured fast's settings at 4x the seed loop
    def row(rate: float, epoch_s: float, accuracies: list[float]) -> dict:
        curve = [{"train_s": epoch_s * (k + 1), "test_accuracy": a} for k, a in enumerate(accuracies)]
        return {"samples_per_s": rate, "train_s": curve[-1]["train_s"], "peak_rss_mb": 1.0, "curve": curve}

    seed = row(1000.0, 100.0, [0.85, 0.90])
    first, second = row(10_000.0, 5.0, [0.90, 0.91]), row(10_000.0, 5.0, [0.89, 0.90])  # 50,000 / 100,000 samples
    accuracy = {"seed": seed, "fast/seed0": first, "fast/seed1": second, "fast@b512/seed0": first}
    rounds = {
        "seed": [{"samples_per_s": 1000.0, "peak_rss_mb": 1.0}],
        "bf16": [{"samples_per_s": 4000.0, "peak_rss_mb": 1.0}],
    }
    results = {"throughput": merge_rounds(rounds), "accuracy": accuracy, "datapath": {}}
    rows = summarise(results, [0.90], {"fast": "bf16"})["accuracy"]
    assert rows["fast/seed0"]["to_target"]["0.900"] == {
        "train_s": 5.0, "ratio_vs_seed": 40.0, "ratio_is_lower_bound": False, "ratio_at_paired_rate": 16.0}  # fmt: skip
    assert rows["fast/seed1"]["to_target"]["0.900"]["ratio_at_paired_rate"] == 8.0
    assert rows["fast (mean)"]["to_target"]["0.900"]["ratio_at_paired_rate"] == 10.7  # 200,000 / 75,000 x 4
    # no throughput row at its settings: the seed loop itself, and a recipe at another batch
    assert "ratio_at_paired_rate" not in rows["seed"]["to_target"]["0.900"]
    assert "ratio_at_paired_rate" not in rows["fast@b512/seed0"]["to_target"]["0.900"]
    machine = {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2", "throughput_samples_per_epoch": 100}
    table = markdown({**summarise(results, [0.90], {"fast": "bf16"}), "machine": machine})
    assert "| fast/seed0 | 0.9100 | 10.0 | 10000 | 5.0 s (40.0×, paired 16.0×) |" in table and "\npaired: " in table


def test_a_curve_scoring_only_its_last_epochs_counts_samples_by_epoch_and_marks_an_early_pass_as_an_upper_bound():
    # 10 epochs of 1,000 samples at 100/s; only epochs 9 and 10 were scored
    curve = [
        {"epoch": 9, "train_s": 90.0, "test_accuracy": 0.93},
        {"epoch": 10, "train_s": 100.0, "test_accuracy": 0.95},
    ]
    late = {"samples_per_s": 100.0, "train_s": 100.0, "epochs": 10, "peak_rss_mb": 1.0, "curve": curve}
    seed_curve = [{"train_s": 100.0, "test_accuracy": 0.80}, {"train_s": 200.0, "test_accuracy": 0.93}]
    seed = {"samples_per_s": 100.0, "train_s": 200.0, "peak_rss_mb": 1.0, "curve": seed_curve}
    rounds = {
        "seed": [{"samples_per_s": 100.0, "peak_rss_mb": 1.0}],
        "x": [{"samples_per_s": 100.0, "peak_rss_mb": 1.0}],
    }
    results = {"throughput": merge_rounds(rounds), "accuracy": {"seed": seed, "late": late}, "datapath": {}}
    rows = summarise(results, [0.93, 0.95], {"late": "x"})["accuracy"]
    # 0.93 may have been passed before epoch 9: 90 s is an upper bound; the paired ratio counts 9 epochs' samples
    assert rows["late"]["to_target"]["0.930"] == {"train_s": 90.0, "ratio_vs_seed": 2.2, "ratio_is_lower_bound": True,
                                                  "ratio_at_paired_rate": 2.2, "at_most": True}  # fmt: skip
    assert "at_most" not in rows["late"]["to_target"]["0.950"]  # epoch 9 was scored below it: epoch 10 is the first
    table = markdown({**summarise(results, [0.93], {"late": "x"}),
                      "machine": {"device": "cpu", "processor": "x", "cpus": 2, "torch": "2",
                                  "throughput_samples_per_epoch": 1}})  # fmt: skip
    assert "| ≤ 90.0 s (>2.2×, paired >2.2×) |" in table
    saved = {**summarise(results, [0.93], {"late": "x"}), "machine": {"device": "cpu"}}
    assert retarget(saved, [0.95], {"late": "y"})["speed_rows"] == {"late": "x"}  # the report's own pairing
