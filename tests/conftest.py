"""Shared fixtures: a tiny synthetic Fashion-MNIST in IDX format, and tiny params."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.dataset import SPLIT_FILES
from pipeline.params import Params, parse_params, with_overrides
from pipeline.train import Paths, command

REPO = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # the offline source the end-to-end runs download from
TIMING_KEYS = frozenset({"epoch_time_s", "samples_per_s", "peak_gpu_memory_mb"})  # curves that change on every run


# Test files whose tests share session fixtures (the reproduced repo and its experiments, half a minute each):
# one pytest-xdist worker takes them together, so that each fixture is built once.
SHARED_SESSION = {
    "tests/test_dvc_record.py": "dvc-repo",
    "tests/test_pipeline_e2e.py": "dvc-repo",
    "tests/test_runs.py": "dvc-repo",
}


# The longest scopes, by measured duration (pytest --durations): handed out first, so that no worker starts one
# of them while the other runs out of work.
LONGEST_FIRST = (
    "tests/test_docs.py",
    "dvc-repo",
    "tests/test_resume.py",
    "tests/test_benchmark.py",
    "tests/test_distributed.py",
)


def scope_of(nodeid: str) -> str:
    """The scope a test runs in on one xdist worker: its file, or its :data:`SHARED_SESSION` group."""
    file = nodeid.split("::", 1)[0]
    return SHARED_SESSION.get(file, file)


def pytest_collection_modifyitems(config, items):
    """Longest scopes first (see :data:`LONGEST_FIRST`); the rest in their usual order. No test depends on order."""

    def rank(item) -> int:
        scope = scope_of(item.nodeid)
        return LONGEST_FIRST.index(scope) if scope in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def pytest_xdist_make_scheduler(config, log):
    """Hand each xdist worker whole test files (module fixtures are built once), :data:`SHARED_SESSION` together.

    (xdist's own ``--dist loadgroup`` would say this with marks, but does not group under pytest 9.2:
    pytest-dev/pytest-xdist#1386.)
    """
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtures(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return SharedFixtures(config, log)


def idx_bytes(t: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an IDX file."""
    header = bytes([0, 0, 0x08, t.ndim]) + struct.pack(f">{t.ndim}I", *t.shape)
    return header + t.contiguous().numpy().tobytes()


def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable images: class k lights up row band k, plus noise. Labels cycle 0..9."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for k in range(10):
        images[labels == k, 2 + 2 * k : 4 + 2 * k, :] = 230
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_raw(folder: Path, n_train: int = 240, n_test: int = 137) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_split(n, seed)
        images_name, labels_name = SPLIT_FILES[split]
        (folder / images_name).write_bytes(idx_bytes(images))
        (folder / labels_name).write_bytes(idx_bytes(labels))
    return folder


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Path:
    """data/raw with 240 train and 137 test synthetic samples."""
    return write_raw(tmp_path / "data" / "raw")


def full_params(*overrides: dict) -> dict:
    """The project's params.yaml with each of ``overrides`` ({section: {key: value}}) laid over it in turn.

    Params files must be complete (the loader fills nothing in), so tests start from the real one.
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for layer in overrides:
        params = with_overrides(params, layer)
    return params


def default_params(*overrides: dict) -> Params:
    """:func:`full_params` as typed params: params.yaml's values, with ``overrides`` laid over them."""
    return parse_params(full_params(*overrides))


TINY = {
    "data": {"subset": 0, "val_size": 40, "split_seed": 0},
    "train": {"epochs": 2, "batch_size": 20, "lr": 0.003, "seed": 1, "eval_batch_size": 32},
    "evaluate": {"batch_size": 50},
}


@pytest.fixture
def write_params(tmp_path: Path):
    """Write a complete params file: tiny values, then ``overrides``, over params.yaml; returns its path."""

    def write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(full_params(TINY, overrides or {})))
        return path

    return write


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (precision, device), as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process state in singletons; each test starts clean."""
    yield
    reset_accelerate_state()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a size-limited filesystem (tmpfs) under ``tmp_path``: ``tmpfs("1m")`` returns its folder."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
        ).returncode:
            pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this venv first on PATH (``accelerate``, ``dvc``), plus ``extra``."""
    return {**os.environ, **extra, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


# Root reads and writes any file whatever its mode, and CI runs as root: there, a child process runs as root without
# the capabilities to, so that file modes bind it (a read-only folder stays read-only).
FILE_MODES_BIND = (
    ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
)


SLURM_STANDINS = Path(__file__).parent / "slurm"  # srun and scontrol stand-ins that run every "node" here


def slurm_job(nodes: int, submit_dir: Path, **extra: str) -> dict[str, str]:
    """What Slurm gives an sbatch job's batch step, for ``nodes`` nodes that are all this machine (127.0.0.1), with
    :data:`SLURM_STANDINS` on PATH; MAIN_PORT (which train.sbatch takes over its job-id port) is a free one."""
    nodelist = ",".join(["127.0.0.1"] * nodes)
    env = child_env(SLURM_JOB_ID="4242", SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=nodelist,
                    SLURM_SUBMIT_DIR=str(submit_dir), MAIN_PORT=str(free_port()), **extra)  # fmt: skip
    return {**env, "PATH": f"{SLURM_STANDINS}{os.pathsep}{env['PATH']}"}


def accelerate_launcher(processes: int, *extra: str) -> list[str]:
    """The pipeline's launcher (dvc.yaml's) of ``processes`` CPU processes (gloo) of one thread each, on a free port."""
    return [sys.executable, "-m", "pipeline.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), *extra]  # fmt: skip


def train_command(out: Path, params: Path, raw: Path, processes: int = 1, checkpoints: Path | None = None) -> list[str]:
    """The train stage on ``processes`` processes, one thread each, writing under ``out``."""
    paths = Paths.under(out, raw)
    if checkpoints is not None:
        paths = Paths(paths.data, paths.model_dir, paths.live_dir, checkpoints)
    launcher = accelerate_launcher(processes) if processes > 1 else []
    return command(params, paths, launcher, "--cpu-threads", "1")


def sh(cwd: Path, *cmd: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with this venv first on PATH and a git identity; raise on failure if ``check``."""
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(**extra_env, **identity), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, overrides: dict) -> None:
    """Lay ``overrides`` ({section: {key: value}}) over ``repo``'s params.yaml in place."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def copy_repo(src: Path, dest: Path) -> Path:
    """A private copy of the repo ``src`` (git history, DVC cache, workspace), for a test that changes it."""

    def dvc_tmp(folder: str, names: list[str]) -> list[str]:  # DVC's locks and state: rebuilt by the copy's dvc
        return ["tmp"] if Path(folder).name == ".dvc" else []

    shutil.copytree(src, dest, symlinks=True, ignore=dvc_tmp)
    return dest


def project_repo(dest: Path, overrides: dict) -> Path:
    """A new git repo at ``dest`` holding the project's tracked files, with ``overrides`` committed in params."""
    if not DEBIAN.is_dir():
        pytest.fail("the end-to-end tests read real data: apt-get install dataset-fashion-mnist")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    set_params(dest, overrides)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.name", "e2e")  # dvc exp commits with the repo's identity
    sh(dest, "git", "config", "user.email", "e2e@example.com")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project")
    return dest


# The end-to-end repo's params (test_pipeline_e2e, test_dvc_record): 2,500 training samples in 50 steps of 50 per
# epoch with a checkpoint every 10 steps (long enough to kill a run mid-epoch), 500 validation, 3,000 test samples.
E2E = {
    "data": {"subset": 3000, "val_size": 500},
    "train": {"epochs": 2, "batch_size": 50, "checkpoint_every_steps": 10},
    "evaluate": {"batch_size": 1000},
}
EXPERIMENTS = {"lr-high": "0.008", "lr-low": "0.001"}  # the `experiments` repo's, by name: train.lr


@dataclass(frozen=True)
class Reproduced:
    repo: Path
    log: str  # what `dvc repro` printed
    md5: str  # its models output's, as dvc.lock records it


def model_md5(repo: Path) -> str:
    """The models output's hash as dvc.lock records it."""
    train = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    return next(o["md5"] for o in train["outs"] if o["path"] == "models")


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Reproduced:
    """A fresh git repo of the project's tracked files with :data:`E2E` params, after one `dvc repro` on a machine
    with no accelerate config, its results committed. Tests that change a repo change their own copy of it."""
    root = tmp_path_factory.mktemp("e2e")
    repo = project_repo(root / "repo", E2E)
    proc = sh(repo, "dvc", "repro", HF_HOME=str(root / "no-accelerate-config"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline results")
    return Reproduced(repo, proc.stdout + proc.stderr, model_md5(repo))


@dataclass(frozen=True)
class Experiments:
    repo: Path  # the baseline in its workspace, the experiments beside it
    md5: dict[str, str]  # each experiment's models output's


@pytest.fixture(scope="session")
def experiments(reproduced, tmp_path_factory) -> Experiments:
    """A copy of ``reproduced`` that also holds the :data:`EXPERIMENTS`, its workspace the baseline again."""
    repo = copy_repo(reproduced.repo, tmp_path_factory.mktemp("exps") / "repo")
    md5 = {}
    for name, lr in EXPERIMENTS.items():
        sh(repo, "dvc", "exp", "run", "-n", name, "-S", f"train.lr={lr}")
        md5[name] = model_md5(repo)
    sh(repo, "git", "checkout", "--", ".")  # the workspace back at the baseline: git for the small files ...
    sh(repo, "dvc", "checkout")  # ... DVC for the cached outputs
    return Experiments(repo, md5)
