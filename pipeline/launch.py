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
- ``PIPELINE_LAUNCH_VIA``, when set, is a command that runs this launch on every node instead (srun and
  ``scripts/slurm/node.sh``, which adds each node's rank and the main node's address): it gets this launch's
  arguments, and each distinct ``error:`` line its nodes print is shown once, at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

from pipeline.errors import ERROR_DIR_VAR, LAUNCHER_PID_VAR, with_restore_hint

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
                              consequence=bool(entry["consequence"]))  # fmt: skip
            entries.append((int(entry["attempt"]), int(entry["rank"]), failure))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    last = max((attempt for attempt, _, _ in entries), default=0)
    return {rank: failure for attempt, rank, failure in entries if attempt == last}


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(VIA_VAR):
        return via_nodes(shlex.split(os.environ[VIA_VAR]), argv)
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(with_env_defaults(argv, os.environ))
    quiet_launcher_logs(os.environ)
    previous = signal.signal(signal.SIGINT, _forward_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-launch-") as folder:
            os.environ.update({ERROR_DIR_VAR: folder, LAUNCHER_PID_VAR: str(os.getpid())})
            unexplained = launch(args)  # empty when the launch succeeded (after restarts, maybe)
            failures = {**unexplained, **told(Path(folder))} if unexplained else {}  # a line over how it ended
    finally:
        signal.signal(signal.SIGINT, previous)
        for var in (ERROR_DIR_VAR, LAUNCHER_PID_VAR):
            os.environ.pop(var, None)
    ended_as = list(failures.values())
    echo = os.environ.get(NODE_VAR) and all(f.consequence for f in causes(ended_as))  # another node's failure's
    return say_errors(to_print(ended_as), exit_code(ended_as), "consequence" if echo else "error")


if __name__ == "__main__":
    sys.exit(main())
