"""The benchmark's numbers and tables: pure functions of the measured rows, no I/O (``bench/benchmark.py``).

Rows are plain dicts as the benchmark's jobs return them; nothing here changes its inputs.
"""

from __future__ import annotations

import statistics
from typing import Any

Row = dict[str, Any]


def time_to(curve: list[Row], target: float) -> float | None:
    """Training seconds until the test accuracy first reaches ``target``; None if it never does."""
    return next((p["train_s"] for p in curve if p["test_accuracy"] >= target), None)


def epoch_of(curve: list[Row], k: int) -> int:
    """The epoch (from 1) of ``curve[k]``: curves that score only their last epochs say which."""
    return curve[k].get("epoch", k + 1)


def at_most(curve: list[Row], target: float) -> bool:
    """Whether the time to ``target`` is only an upper bound: the first epoch scored, not the first epoch, got there."""
    return bool(curve) and epoch_of(curve, 0) > 1 and curve[0]["test_accuracy"] >= target


def samples_to(row: Row, target: float) -> float | None:
    """Training samples until ``row``'s test accuracy first reaches ``target`` (its epochs are of equal size)."""
    curve = row["curve"]
    per_epoch = row["samples_per_s"] * row["train_s"] / row.get("epochs", len(curve))
    return next((per_epoch * epoch_of(curve, k) for k, p in enumerate(curve) if p["test_accuracy"] >= target), None)


def paired_ratio(mine: list[float | None], seed: Row | None, target: float, speed: float | None) -> float | None:
    """How many times sooner than the seed loop runs reaching ``target`` after ``mine`` samples (their mean) would
    get there if both trained at the paired throughput ratio ``speed``: the time ratio free of the host's drift."""
    theirs = samples_to(seed, target) if seed is not None else None
    known = [m for m in mine if m is not None]
    if not known or len(known) < len(mine) or theirs is None or not speed:
        return None  # a run that never got there, no seed-loop figure, or no throughput row to pair with
    return round(theirs / statistics.fmean(known) * speed, 1)


def merge_rounds(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """One row per throughput variant from its rounds: medians, the per-round rates, and ratios to the seed loop.

    Round ``r`` of every variant ran back to back, so ``rate_r / seed_rate_r`` compares runs made
    minutes apart; the row's ratio is the median of those, with their range.
    """
    seed = [r["samples_per_s"] for r in rounds.get("seed", [])]
    rows = {}
    for name, runs in rounds.items():
        rates = [r["samples_per_s"] for r in runs]
        row = {**runs[0], "samples_per_s": round(statistics.median(rates), 1), "samples_per_s_rounds": rates}
        if "first_epoch_samples_per_s" in runs[0]:
            row["first_epoch_samples_per_s"] = round(statistics.median(r["first_epoch_samples_per_s"] for r in runs), 1)
        for key in ("peak_rss_mb", "peak_gpu_mb"):
            if key in runs[0]:
                row[key] = max(r[key] for r in runs)
        if len(seed) == len(rates):
            ratios = [mine / theirs for mine, theirs in zip(rates, seed, strict=True)]
            row["ratio_vs_seed"] = round(statistics.median(ratios), 2)
            row["ratio_vs_seed_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
        else:
            row["ratio_vs_seed"] = None
        rows[name] = row
    return rows


def _versus_seed(mine: float | None, seed: Row | None, target: float) -> Row:
    """Time to ``target`` and its ratio to the seed loop's (a lower bound when the seed loop never got there)."""
    entry: Row = {"train_s": mine}
    if seed is not None and mine:
        theirs = time_to(seed["curve"], target)
        entry["ratio_vs_seed"] = round((theirs or seed["train_s"]) / mine, 1)
        entry["ratio_is_lower_bound"] = theirs is None
    return entry


def _with_paired(entry: Row, runs: list[Row], seed: Row | None, target: float, speed: float | None) -> Row:
    """``entry`` plus its :func:`paired_ratio`, when there is one."""
    ratio = paired_ratio([samples_to(r, target) for r in runs], seed, target, speed)
    return entry if ratio is None else {**entry, "ratio_at_paired_rate": ratio}


def _bounded(entry: Row, upper: bool) -> Row:
    """``entry``, marked when its time is only an upper bound (:func:`at_most`): its ratios are then lower bounds."""
    if not upper:
        return entry
    return {**entry, "at_most": True} | ({"ratio_is_lower_bound": True} if "ratio_vs_seed" in entry else {})


def with_targets(row: Row, targets: list[float], seed: Row | None, speed: float | None = None) -> Row:
    """``row`` plus its final test accuracy and, per target, the time to it and the ratio to the seed loop
    (and, given the paired throughput ratio ``speed`` of its settings, :func:`paired_ratio`)."""
    to_target = {f"{t:.3f}": _bounded(_with_paired(_versus_seed(time_to(row["curve"], t), seed, t), [row], seed, t,
                                                   speed), at_most(row["curve"], t)) for t in targets}  # fmt: skip
    return {**row, "final_test_accuracy": row["curve"][-1]["test_accuracy"], "to_target": to_target}


def seed_means(accuracy: dict[str, Row], seed: Row | None, speeds: dict[str, float | None]) -> dict[str, Row]:
    """One ``NAME (mean)`` row per recipe run over several seeds (rows ``NAME/seedS``)."""
    means = {}
    for recipe in dict.fromkeys(k.partition("/seed")[0] for k in accuracy if "/seed" in k):
        runs = [r for k, r in accuracy.items() if k.startswith(f"{recipe}/seed")]
        to_target = {}
        for t in runs[0]["to_target"]:
            times = [r["to_target"][t]["train_s"] for r in runs]
            mean = None if None in times else round(statistics.fmean(times), 2)
            entry = _with_paired(_versus_seed(mean, seed, float(t)), runs, seed, float(t), speeds.get(recipe))
            to_target[t] = _bounded(entry, any(r["to_target"][t].get("at_most") for r in runs))
        means[f"{recipe} (mean)"] = {
            "seeds": len(runs),
            "final_test_accuracy": round(statistics.fmean(r["final_test_accuracy"] for r in runs), 5),
            "train_s": round(statistics.fmean(r["train_s"] for r in runs), 2),
            "samples_per_s": round(statistics.fmean(r["samples_per_s"] for r in runs), 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "to_target": to_target,
        }
    return means


def data_share(recipe: str, row: Row, accuracy: dict[str, Row], throughput: dict[str, Row]) -> Row:
    """``row`` (the data path's ms per batch) plus the step time at the recipe's measured rate, and its share."""
    rate = accuracy.get(recipe, accuracy.get(f"{recipe} (mean)", {})).get("samples_per_s")
    if recipe == "default" and "default" in throughput:
        rate = throughput["default"]["samples_per_s"]
    if not rate:
        return dict(row)
    step_ms = 1000 * row["batch_size"] / rate
    return {**row, "step_ms": round(step_ms, 2), "data_share": round(row["data_ms_per_step"] / step_ms, 4)}


def summarise(
    results: dict[str, dict[str, Row]], targets: list[float], speed_rows: dict[str, str] | None = None
) -> Row:
    """The report: ratios to the seed loop, times to each target, seed means, and the data path's share of a step.

    ``speed_rows`` names, per recipe, the throughput row that trains at its speed; its recipe rows then also
    get :func:`paired_ratio` (rows at another batch, ``NAME@bB``, do not).
    """
    seed = results["accuracy"].get("seed")
    throughput = results["throughput"]
    speeds = {recipe: throughput.get(row, {}).get("ratio_vs_seed") for recipe, row in (speed_rows or {}).items()}
    accuracy = {name: with_targets(row, targets, seed, speeds.get(name.partition("/seed")[0]))
                for name, row in results["accuracy"].items()}  # fmt: skip
    accuracy.update(seed_means(accuracy, seed, speeds))
    datapath = {name: data_share(name, row, accuracy, throughput) for name, row in results["datapath"].items()}
    return {"targets": targets, "throughput": throughput, "accuracy": accuracy, "datapath": datapath,
            "scaling": scaling_ratios(results.get("scaling", {})), "speed_rows": dict(speed_rows or {})}  # fmt: skip


def retarget(report: Row, targets: list[float], speed_rows: dict[str, str] | None = None) -> Row:
    """A saved report (``--out``'s JSON) summarised again for other ``targets``, from the rows it measured (and
    with the speed rows it saved, else ``speed_rows``).

    Raises ValueError, saying what is missing, for anything that is not such a report."""
    need = ("throughput", "accuracy", "datapath", "machine")
    if not isinstance(report, dict) or not all(isinstance(report.get(k), dict) for k in need):
        raise ValueError(f"not a benchmark report: it needs the objects {', '.join(need)}")
    accuracy = {k: r for k, r in report["accuracy"].items() if not k.endswith(" (mean)")}  # summarise remakes these
    results = {"throughput": report["throughput"], "datapath": report["datapath"], "accuracy": accuracy,
               "scaling": report.get("scaling") or {}}  # fmt: skip
    try:
        return {**summarise(results, targets, report.get("speed_rows") or speed_rows), "machine": report["machine"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a benchmark report: a row lacks {e}") from None


def scaling_ratios(rows: dict[str, Row]) -> dict[str, Row]:
    """The scaling rows, each with its rate relative to its reference: one process for the process rows, the
    same model at the default batch (128) for the batch rows."""
    out = {}
    for name, row in rows.items():  # named as bench_stage.SCALING names them: NPROC, or MODEL/bB
        ref = rows.get("1proc") if name.endswith("proc") else rows.get(f"{row['model']}/b128")
        out[name] = {**row, "relative": round(row["samples_per_s"] / ref["samples_per_s"], 2) if ref else None}
    return out


def scaling_lines(rows: dict[str, Row]) -> list[str]:
    lines = ["\nScaling (samples/s of the second of 2 epochs; × the 1-process or batch-128 row):\n",
             "| run | global batch | lr | samples/s | × |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows.values():
        name = f"{r['model']}, {r['processes']} process(es) × {r['threads']} threads"
        lines.append(f"| {name} | {r['batch_size']} | {r['lr']} | {r['samples_per_s']:.0f} | {r['relative']} |")
    return lines


def machine_line(m: dict) -> str:
    """Where a report was measured: device, CPU model and cores, torch, and the threads where the report has them."""
    threads = ""
    if "stage_threads" in m:
        threads = f"; threads: seed loop {m['seed_loop_threads']}, stage {m['stage_threads']}"
    return f"{m['device']} ({m['processor']}, {m['cpus']} CPUs), torch {m['torch']}{threads}"


def target_cell(entry: Row) -> str:
    """One time-to-target cell: the seconds, the ratio to the seed loop and the paired ratio, where there are."""
    if entry["train_s"] is None:
        return "not reached"
    ratio = entry.get("ratio_vs_seed")
    mark = ">" if entry.get("ratio_is_lower_bound") else ""
    lower = ">" if entry.get("at_most") else ""
    paired = f", paired {lower}{entry['ratio_at_paired_rate']}×" if "ratio_at_paired_rate" in entry else ""
    bound = "≤ " if entry.get("at_most") else ""
    return f"{bound}{entry['train_s']:.1f} s" + (f" ({mark}{ratio}×{paired})" if ratio else "")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"\n{machine_line(m)}\n"]
    gpu = m["device"] != "cpu"
    mem = "| peak RSS (MB) |" + (" peak GPU (MB) |" if gpu else "")
    if report["throughput"]:
        n = max(len(r["samples_per_s_rounds"]) for r in report["throughput"].values())
        rounds = f"{n} rounds" if n > 1 else "1 round"
        lines += [f"Throughput ({m['throughput_samples_per_epoch']} samples per timed epoch; median of {rounds}, "
                  "× seed: median of the per-round ratios, with their range):\n",
                  "| variant | samples/s | × seed | × seed range | first epoch samples/s " + mem,
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]  # fmt: skip
        for name, r in report["throughput"].items():
            first = f"{r['first_epoch_samples_per_s']:.0f}" if "first_epoch_samples_per_s" in r else ""
            spread = "-".join(map(str, r.get("ratio_vs_seed_range", [])))
            lines.append(f"| {name} | {r['samples_per_s']:.0f} | {r['ratio_vs_seed']} | {spread} | {first} | "
                         f"{r['peak_rss_mb']:.0f} |" + (f" {r.get('peak_gpu_mb', '')} |" if gpu else ""))  # fmt: skip
    if report["accuracy"]:
        heads = " | ".join(f"to {float(t):.1%} (× seed)" for t in report["targets"])
        lines += ["\nTime to test accuracy (training seconds, evaluation excluded; ≤: the first epoch scored "
                  "already passed it):\n",
                  f"| recipe | final test acc | train s | samples/s | {heads} " + mem,
                  "|---|---:|---:|---:|" + "---:|" * (len(report["targets"]) + 1 + gpu)]  # fmt: skip
        for name, r in report["accuracy"].items():
            cells = [target_cell(entry) for entry in r["to_target"].values()]
            lines.append(f"| {name} | {r['final_test_accuracy']:.4f} | {r['train_s']:.1f} | {r['samples_per_s']:.0f}"
                         f" | {' | '.join(cells)} | {r['peak_rss_mb']:.0f} |"
                         + (f" {r.get('peak_gpu_mb', '')} |" if gpu else ""))  # fmt: skip
        if any("ratio_at_paired_rate" in e for r in report["accuracy"].values() for e in r["to_target"].values()):
            lines.append("\npaired: the seed loop's training samples to the target over the recipe's, times the "
                         "throughput rounds' ratio for the recipe's settings (paired by round): free of the host's "
                         "drift between the rows.")  # fmt: skip
    if report["datapath"]:
        lines += ["\nDevice data path (index + flip + translate + cutout + to float) per global batch:\n",
                  "| recipe | batch | data ms/step | step ms | data share |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in report["datapath"].items():
            share = f"{r['data_share']:.1%}" if "data_share" in r else ""
            step = f"{r['step_ms']:.1f}" if "step_ms" in r else ""
            lines.append(f"| {name} | {r['batch_size']} | {r['data_ms_per_step']:.2f} | {step} | {share} |")
    if report.get("scaling"):
        lines += scaling_lines(report["scaling"])
    return "\n".join(lines)
