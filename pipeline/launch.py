"""``accelerate launch`` for the pipeline's stages, with a failure told in one line.

    python -m pipeline.launch [accelerate launch options] -m pipeline.train [train options]

It takes ``accelerate launch``'s options and runs its launchers, and adds:

- ``ACCELERATE_CONFIG_FILE``, when set and ``--config_file`` is not given, is the config file, and
  ``PET_MAX_RESTARTS`` (torchrun's variable) the ``--max_restarts``: how often the group restarts after
  losing a worker, each time resuming from the newest checkpoint;
- a failure ends in one ``error: ...`` line, with no launcher traceback. Each process hands its line
  to this launcher instead of printing it; the launcher prints the first failure's line, then any
  other process's line that says something else. A process that failed without a line (killed by a
  signal, or a bug's traceback above) is named with how it ended. Lines of processes that were only
  stopped because another one failed are left out. The exit status is the first failure's;
- Ctrl-C: ``error: interrupted``, once, exit status 130;
- no "values were not passed ... had defaults used instead" warning when there is no accelerate config;
- torch's launcher log (closing signals, restarts) stays quiet unless ``LOGLEVEL`` is set;
- on a machine with GPUs, one GPU per process, held while they run: the launch takes free ones (waiting for them
  if other runs hold them all), shows its processes only those (``CUDA_VISIBLE_DEVICES``) and says which, so
  that runs side by side (``dvc queue start -j N``) each get their own (:mod:`pipeline.gpus`);
- ``PIPELINE_LAUNCH_VIA``, when set, is a command that runs this launch on every node instead (srun and
  ``scripts/slurm/node.sh``, which adds each node's rank and the main node's address): it gets this launch's
  arguments, and each distinct ``error:`` line its nodes print is shown once, at the end.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import psutil

from pipeline import gpus
from pipeline.errors import (
    ERROR_DIR_PREFIX,
    ERROR_DIR_VAR,
    LAUNCHER_PID_VAR,
    TERMINAL_VAR,
    PipelineError,
    cli,
    with_restore_hint,
)

# options a dvc.yaml command cannot take from the user, taken from the environment when not given:
# the accelerate config, and torchrun's own variable for --max-restarts (restarts of a group that lost a worker)
FROM_ENV = {"--config_file": "ACCELERATE_CONFIG_FILE", "--max_restarts": "PET_MAX_RESTARTS"}
VIA_VAR = "PIPELINE_LAUNCH_VIA"  # a command that runs the launch on every node (scripts/slurm/train.sbatch sets it)
NODE_VAR = "PIPELINE_LAUNCH_NODE"  # set for the launches VIA_VAR starts: one node's part of a launch
DEFAULTS_WARNING = "had defaults used instead"
TORCH_LAUNCHER_LOGS = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")


@dataclass(frozen=True)
class Failure:
    """How one process ended: its own line (``told``), or how it ended when it left none."""

    message: str
    code: int
    time: float
    told: bool = True
    consequence: bool = False  # of another process's failure (stopped, or lost a peer): left out if that one told
    blames: tuple[int, ...] = ()  # the ranks this failure says caused it (stopped making progress)


def with_env_defaults(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` with each option of :data:`FROM_ENV` that its launcher part lacks put in front, from its variable."""
    mine = argv[: argv.index("-m")] if "-m" in argv else argv  # after -m: the module's own arguments
    given = {a.split("=")[0].replace("-", "_") for a in mine if a.startswith("--")}
    front = [x for flag, var in FROM_ENV.items() if env.get(var) and flag.replace("-", "_") not in given
             for x in (flag, env[var])]  # fmt: skip
    return [*front, *argv]


def told(folder: Path) -> dict[int, Failure]:
    """The lines the processes of the last attempt handed in, by rank (a line that cannot be read is skipped).

    Under ``--max_restarts`` a group that failed and restarted has left lines of earlier attempts too.
    """
    entries = []
    for path in folder.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            failure = Failure(str(entry["message"]), int(entry["code"]), float(entry["time"]),
                              consequence=bool(entry["consequence"]),
                              blames=tuple(int(r) for r in entry.get("blames", ())))  # fmt: skip
            entries.append((int(entry["attempt"]), int(entry["rank"]), failure))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    last = max((attempt for attempt, _, _ in entries), default=0)
    return {rank: failure for attempt, rank, failure in entries if attempt == last}


def with_blame(failures: dict[int, Failure]) -> dict[int, Failure]:
    """``failures`` with the end of each rank another one blamed (a stopped process, killed once the group gave
    up on it) made a consequence of that rank's failure: the line that names it says it all."""
    blamed = {rank for f in failures.values() for rank in f.blames}
    return {r: replace(f, consequence=True) if r in blamed and not f.told else f for r, f in failures.items()}


def causes(failures: Sequence[Failure]) -> list[Failure]:
    """The failures that explain the launch, first first: those without a line of their own, then by time;
    consequences of another's failure (stopped, lost a peer) only when nothing else explains it."""
    ordered = sorted(failures, key=lambda f: (f.told, f.time))
    return [f for f in ordered if not f.consequence] or ordered[:1]


def to_print(failures: Sequence[Failure]) -> list[str]:
    """The lines to show: the causes' lines, each once."""
    return list(dict.fromkeys(f.message for f in causes(failures)))


def exit_code(failures: Sequence[Failure]) -> int:
    """The status of the failure printed first; 0 when nothing failed."""
    first = causes(failures)
    return first[0].code if first else 0


def ended(how: int, who: str, when: float) -> Failure:
    """A process that failed without saying why: ``how`` is its exit status, or minus the signal that killed it.

    Death by SIGTERM or SIGINT is how the launcher ends the rest of a group once one process failed (one not
    yet far enough to say a line of its own dies of it), so it is a consequence, told only if nothing else is.
    """
    if how < 0:
        line = f"{who} was killed by {signal.Signals(-how).name}; run it again to resume from the newest checkpoint"
        return Failure(
            with_restore_hint(line), 128 - how, when, told=False, consequence=-how in (signal.SIGTERM, signal.SIGINT)
        )
    line = f"{who} exited with status {how} (its output above says why)"
    return Failure(with_restore_hint(line), how, when, told=False)


def launch(args: object) -> dict[int, Failure]:
    """Run accelerate's launcher; how its processes failed, by rank (-1: the launcher itself); empty if none did."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(args)
    except ChildFailedError as e:
        return {rank: ended(f.exitcode, f"rank {rank} (pid {f.pid})", f.timestamp) for rank, f in e.failures.items()}
    except subprocess.CalledProcessError as e:
        return {0: ended(e.returncode, "the process", 0.0)}
    except SignalException as e:
        return {-1: _signalled(e.sigval)}
    except KeyboardInterrupt:
        return {-1: _signalled(signal.SIGINT)}
    except SystemExit as e:  # accelerate's --quiet one-process launcher exits 1 on any failure
        if e.code:
            return {0: Failure("the process failed (its output above says why)", 1, 0.0, told=False)}
    return {}


def _signalled(sig: int) -> Failure:
    """The launcher itself was signalled: its processes' own lines (sorted first) say more, if they left any."""
    message = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    return Failure(message, 128 + sig, float("inf"), consequence=True)


def _forward_interrupt(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while one process runs: pass it on and wait for the process to end (it says its line)."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGINT)
        except psutil.Error:
            pass


def quiet_launcher_logs(env: Mapping[str, str]) -> None:
    """Keep the launchers' log off stderr: accelerate's "values ... had defaults used instead" warning (its
    defaults, one process and the precision params decide, are the stage's), and unless LOGLEVEL is set,
    torch's launcher log (closing signals, restarts, failure tables)."""
    logging.getLogger("accelerate.commands.launch").addFilter(lambda r: DEFAULTS_WARNING not in r.getMessage())
    if env.get("LOGLEVEL"):
        return
    for name in TORCH_LAUNCHER_LOGS:
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def via_nodes(via: Sequence[str], argv: Sequence[str]) -> int:
    """Run ``via`` with this launch's arguments (it starts the launch on each node) and wait for it.

    Its output passes through, but the nodes' ``error:`` lines are held back and each distinct one printed once
    at the end. A node whose processes were only stopped because another node failed tags its line
    ``consequence:``; those are shown only if no node says more.
    """
    env = {k: v for k, v in os.environ.items() if k != VIA_VAR} | {NODE_VAR: "1"}  # the nodes' launches launch
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the nodes' launches through via
    said: dict[str, dict[str, None]] = {"error": {}, "consequence": {}}  # each node's lines, in order, once
    try:
        with subprocess.Popen([*via, *argv], env=env, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
            assert proc.stderr is not None
            for line in proc.stderr:
                tag, _, message = line.rstrip("\n").partition(": ")
                if tag in said:
                    said[tag][message] = None
                else:
                    sys.stderr.write(line)
    except OSError as e:
        return say_errors([f"{VIA_VAR} runs {via[0]!r}, which cannot start ({e.strerror}); unset {VIA_VAR} to "
                           "launch on this machine, or run where it exists"], 2)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return say_errors(list(said["error"] or said["consequence"]), code)  # a node's cause beats another's echo


def say_errors(messages: Iterable[str], code: int, tag: str = "error") -> int:
    """Print each message as a ``tag: message`` line on stderr; return ``code``."""
    for message in messages:
        print(f"{tag}: {message}", file=sys.stderr, flush=True)
    return code


def check_env(env: Mapping[str, str]) -> None:
    """Refuse, in one line, a variable the launch reads (:data:`FROM_ENV`, :data:`VIA_VAR`, ``LOGLEVEL``) that it
    cannot use."""
    restarts = env.get(FROM_ENV["--max_restarts"], "")
    if restarts and not restarts.isdigit():
        raise PipelineError(f"PET_MAX_RESTARTS={restarts!r} is no count of restarts; set it to 0 or more, or unset it")
    levels = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")  # logging's own names
    if env.get("LOGLEVEL") and env["LOGLEVEL"] not in levels:  # torch's launchers set it
        names = ", ".join(levels)
        raise PipelineError(f"LOGLEVEL={env['LOGLEVEL']!r} is no log level; set it to one of {names}, or unset it")
    try:
        shlex.split(env.get(VIA_VAR, ""))
    except ValueError as e:
        raise PipelineError(f"{VIA_VAR}={env[VIA_VAR]!r} is not a command line ({e}); fix it or unset it") from None


def check_config(config_file: str | None, env: Mapping[str, str]) -> None:
    """Read the accelerate config the launch will use, as accelerate does, and refuse one it cannot use in one line
    naming where it came from (``ACCELERATE_CONFIG_FILE``, ``--config_file``, or accelerate's default config)."""
    import yaml
    from accelerate.commands.config import default_config_file, load_config_from_file

    if config_file is None and not os.path.isfile(default_config_file):
        return
    path, var, new = config_file or default_config_file, FROM_ENV["--config_file"], "`accelerate config --config_file`"
    if config_file is None:
        named, fix = f"accelerate's default config {path}", "write it anew with `accelerate config`"
    elif env.get(var) == config_file:
        named, fix = f"{var}={path}", f"point {var} at another ({new} writes one), or unset it"
    else:
        named, fix = f"--config_file {path}", f"pass another ({new} writes one)"
    try:
        if not os.path.isfile(path):
            raise ValueError("it does not exist" if not os.path.exists(path) else "it is not a file")
        with open(path, encoding="utf-8") as f:
            if not isinstance(yaml.safe_load(f), dict):  # JSON, accelerate's other format, is YAML too
                raise ValueError("it is not a mapping of settings (`key: value` lines)")
        load_config_from_file(path)
    except Exception as e:  # what accelerate (or YAML) says is wrong with it, whatever the exception's type
        why = " ".join(str(e).split()) or type(e).__name__
        raise PipelineError(f"{named} is not an accelerate config a launch can use: {why}; fix it, or {fix}") from None


@contextmanager
def gpus_taken(args: argparse.Namespace, env: MutableMapping[str, str]) -> Iterator[None]:
    """While the block runs, hold the GPUs this launch's processes will use (:mod:`pipeline.gpus`) and show the
    processes only those (``CUDA_VISIBLE_DEVICES``); nothing when it uses no GPU or ``PIPELINE_GPUS=shared``."""
    import torch
    from accelerate.commands.launch import _validate_launch_command

    # accelerate's own reading of the flags and the config: how many processes it starts here, which GPUs they see
    launched = _validate_launch_command(copy.deepcopy(args))[0]
    cpu = launched.cpu or getattr(launched, "use_cpu", False)
    need = 0 if cpu else launched.num_processes // max(1, launched.num_machines)
    pool = gpus.pool(env, gpus.visible(env, torch.cuda.device_count(), launched.gpu_ids)) if need else []
    if not pool:
        yield
        return
    report = functools.partial(print, flush=True)
    with gpus.held(pool, need, gpus.lock_folder(env), gpus.waits(env), report) as taken:
        report(gpus.taken_line(taken, pool))
        before = env.get(gpus.VISIBLE_VAR)
        env[gpus.VISIBLE_VAR] = ",".join(taken)
        args.gpu_ids = "all"  # else accelerate would show the processes the config's gpu_ids (the pool) instead
        try:
            yield
        finally:
            if before is None:
                env.pop(gpus.VISIBLE_VAR, None)
            else:
                env[gpus.VISIBLE_VAR] = before


@cli
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check_env(os.environ)
    if os.environ.get(VIA_VAR):
        return via_nodes(shlex.split(os.environ[VIA_VAR]), argv)
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(with_env_defaults(argv, os.environ))
    check_config(args.config_file, os.environ)
    quiet_launcher_logs(os.environ)
    with gpus_taken(args, os.environ):
        failures = launch_here(args)
    ended_as = list(failures.values())
    echo = os.environ.get(NODE_VAR) and all(f.consequence for f in causes(ended_as))  # another node's failure's
    return say_errors(to_print(ended_as), exit_code(ended_as), "consequence" if echo else "error")


def launch_here(args: argparse.Namespace) -> dict[int, Failure]:
    """Run the launch on this machine; how its processes failed, each with its own line where it left one."""
    previous = signal.signal(signal.SIGINT, _forward_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix=ERROR_DIR_PREFIX) as folder:
            os.environ.update({ERROR_DIR_VAR: folder, LAUNCHER_PID_VAR: str(os.getpid())})
            if sys.stderr.isatty():  # accelerate passes a process's stderr on live: a progress bar still shows
                os.environ[TERMINAL_VAR] = "1"
            unexplained = launch(args)  # empty when the launch succeeded (after restarts, maybe)
            failures = (
                with_blame({**unexplained, **told(Path(folder))}) if unexplained else {}
            )  # a line over how it ended
    finally:
        signal.signal(signal.SIGINT, previous)
        for var in (ERROR_DIR_VAR, LAUNCHER_PID_VAR, TERMINAL_VAR):
            os.environ.pop(var, None)
    return failures


if __name__ == "__main__":
    sys.exit(main())
