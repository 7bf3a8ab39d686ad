"""What a training run is made of: the key a checkpoint must match to resume, and a model's provenance.

A :class:`RunKey` holds the sha256 of every source file of the package that the train stage imports,
the sha256 of the training data, the params that shape the weights (the precision among them) and the
process count. Two runs with the same key train the same weights, so only then does one resume the
other's checkpoint; :func:`first_difference` names, in a few words, what makes two keys differ.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import torch

from pipeline.dataset import SPLIT_FILES
from pipeline.gpus import in_use
from pipeline.params import Params, training_params

PACKAGE = Path(__file__).resolve().parent  # pipeline/
SOURCE_ROOT = PACKAGE.parent  # file names are relative to it: "pipeline/train.py"


def _module_file(module: str) -> Path | None:
    base = SOURCE_ROOT / module.replace(".", "/")
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def import_closure(module: str) -> list[str]:
    """Source files of ``module`` and of every ``pipeline`` module it imports, transitively.

    Names are relative to the package's parent (``pipeline/train.py``) and sorted; the package's
    ``__init__.py`` is included, since importing any module runs it. Imports anywhere in a file count,
    also those inside functions.
    """
    seen: set[Path] = {PACKAGE / "__init__.py"}
    todo = [module]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += [module.rsplit(".", 1)[0]] if module.count(".") > 1 else []  # a subpackage's __init__ runs too
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE.name:  # from pipeline import data
                todo += [f"{PACKAGE.name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{PACKAGE.name}."):
                todo.append(node.module or "")
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith(f"{PACKAGE.name}.")]
    return sorted(str(p.relative_to(SOURCE_ROOT)) for p in seen)


def file_digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each file ``root / name``, keyed by name."""
    return {name: hashlib.sha256((Path(root) / name).read_bytes()).hexdigest() for name in sorted(names)}


@dataclass(frozen=True)
class RunKey:
    """Everything that decides the trained weights; equal keys, equal runs."""

    code: dict[str, str]  # source file -> sha256
    data: dict[str, str]  # training IDX file -> sha256
    params: dict[str, Any]  # "train.lr" -> 0.002: the params that shape training
    processes: int  # the process count changes the float summation order, so the rounding

    def fingerprint(self) -> str:
        """16 hex digits naming the run (and its checkpoint folder)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> RunKey:
        """Rebuild a key written by :meth:`to_json`; raises ValueError if ``raw`` is not one."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != fields:
            raise ValueError(f"not a run key (want keys {sorted(fields)})")
        if not all(isinstance(raw[k], dict) for k in ("code", "data", "params")) or not isinstance(
            raw["processes"], int
        ):
            raise ValueError("run key fields have the wrong types")
        return cls(**raw)


def run_key(params: Params, data_dir: str | Path, processes: int) -> RunKey:
    """The key of training ``params`` on the IDX files in ``data_dir`` with ``processes`` processes."""
    return RunKey(
        code=file_digests(SOURCE_ROOT, import_closure("pipeline.train")),
        data=file_digests(Path(data_dir), SPLIT_FILES["train"]),
        params=training_params(params),
        processes=processes,
    )


def _differing(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    return next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)


def first_difference(old: RunKey, new: RunKey) -> str | None:
    """What differs first between two keys, for a one-line message; None when they are equal.

    Code first, then data, then a param (the precision by that name), then the process count.
    """
    for what, a, b in (("code", old.code, new.code), ("data", old.data, new.data)):
        name = _differing(a, b)
        if name is not None:
            change = "added" if name not in a else "removed" if name not in b else "changed"
            return f"{what} ({name} {change})"
    name = _differing(old.params, new.params)
    if name is not None:
        what = "precision" if name == "train.mixed_precision" else "param"
        return f"{what} {name} ({old.params.get(name)!r} there, {new.params.get(name)!r} now)"
    if old.processes != new.processes:
        return f"process count ({old.processes} there, {new.processes} now)"
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (CPU results are bitwise reproducible only on the same model), with its family and
    model numbers, which tell apart CPUs that a virtual machine names alike ("AMD EPYC").

    ``cpuinfo``: the text of /proc/cpuinfo (default: this machine's); its first processor is the one named.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def environment(device: torch.device, mixed_precision: str) -> dict[str, Any]:
    """Where a run trained: library versions, device (the GPUs' model, and which of this machine's GPUs), precision
    in force, CPU threads."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "device": device.type,
        "mixed_precision_in_force": mixed_precision,
        "cpu": cpu_model(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpus"] = in_use(os.environ, torch.cuda.device_count())  # those pipeline.launch took, e.g. ["1"]
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env
