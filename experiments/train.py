"""Train one experiment: ``python -m experiments.train --config=FILE[:PRESET] --workdir=DIR``.

Overrides: ``--config.key=value`` (e.g. ``--config.batch_size=64 --config.optimizer.learning_rate=1e-3``);
an unknown key or a value of the wrong type stops at once with a message naming the key.
Running the same command on the same workdir resumes from its newest checkpoint.

Multi-host (TPU pods, GPU clusters): run the same command on every host. The coordinator
address, number of processes and process id come from ``--coordinator_address``,
``--num_processes``, ``--process_id`` or the environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; ``HGRN_DISTRIBUTED=1`` lets JAX detect the cluster).

CPU testing: ``HGRN_NUM_CPU_DEVICES=N`` simulates N CPU devices; multi-process CPU runs use the
gloo collectives; ``python -m experiments.launch --num_processes=4 --devices_per_process=2 --
<these flags>`` runs a whole pod on one machine (docs/pods.md). Failure detection:
``HGRN_HEARTBEAT_TIMEOUT_S``, ``HGRN_SHUTDOWN_TIMEOUT_S``, ``HGRN_STEP_TIMEOUT_S``
(:mod:`hgrn_jax.training.watchdog`); a process that loses a peer, or whose steps or input
stall for ``HGRN_STEP_TIMEOUT_S`` (default 1800 s, one process too), exits with code 3.

Exit codes: 0 finished, or preempted by SIGTERM after saving a checkpoint (the message says
which; rerun to resume); 1 the loss became NaN/inf (the message gives the step); 2 a user error:
a bad flag, config file or value, missing or malformed data, a workdir that is in use (another
run holds ``workdir/run.lock``), not writable or holds a run with an incompatible config (see
``--config.resume``), or a checkpoint that cannot be read. User errors print one line naming the
file or key and the fix (one raised under the user's own code, a task module's ``loss_fn`` say,
ends with ``(raised in FILE:LINE in FUNCTION)``); ``--traceback`` shows the full traceback instead. Ctrl-C (SIGINT) in the
training loop stops after the step, saves a checkpoint and ends by SIGINT (status 130); a second
Ctrl-C, or one before or after the loop, stops at once (the last complete checkpoint is kept).

Resuming: the workdir's config.json is compared with the new config. Changes to the model, the
data's shapes, the task or the optimizer's structure stop the run (exit 2, keys listed) unless
``--config.resume=restart`` (move the previous run into ``workdir/previous-<time>/`` and start
again) or ``--config.resume=force`` (resume anyway; still refused, config.json untouched, if the
checkpoint's arrays do not fit). Other changes (more steps, evaluation/log/checkpoint frequency, ...) are listed in a
warning and used.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, optionally with a preset: path.py[:PRESET].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, results).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show full tracebacks instead of one-line error messages."
)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_NONFINITE = 1


def _configure_jax() -> None:
    """Settings that must precede JAX's backend initialisation."""
    import jax

    from hgrn_jax import sharding

    num_cpu = sharding.env_whole_number("HGRN_NUM_CPU_DEVICES", 1)
    if num_cpu:
        jax.config.update("jax_num_cpu_devices", num_cpu)
    processes = _NUM_PROCESSES.value or sharding.env_whole_number("JAX_NUM_PROCESSES", 1) or 1
    if processes > 1 and os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    sharding.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )


def _end_by_sigint() -> NoReturn:
    """Exit as a program interrupted by Ctrl-C does: killed by SIGINT, status 130 in a shell,
    so that the shell loop or script that ran this one stops too. No traceback is printed.

    The run's own clean-up (lock, checkpoint manager, input workers, metrics) is done by now;
    the interpreter's shutdown is skipped: interrupted while JAX built the model (2.5-4 s
    into a run), it ended in a segmentation fault in 5 of 6 tries, status 139, after the
    one-line message."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    raise KeyboardInterrupt  # not reached: SIGINT's default action ends the process


def _pod_collective_failure(error: BaseException) -> bool:
    """In a pod, a failed collective means a lost peer process (gloo: ``Connection closed by
    peer``). In the training loop the peer monitor was asked (``watchdog.Guard``) and, if a
    peer was lost, this process has already ended with its line and exit 3; an error it found
    every peer alive for carries ``PEERS_ALIVE_NOTE`` and is this process's own. Elsewhere
    (restore, the final test) no monitor runs: True for JAX's runtime errors."""
    import jax

    from hgrn_jax.training import watchdog

    return (
        jax.process_count() > 1
        and watchdog.is_collective_failure(error)
        and watchdog.PEERS_ALIVE_NOTE not in getattr(error, "__notes__", ())
    )


def _stop_on_lost_peer(error: BaseException, config) -> NoReturn:
    """One line and exit 3 (``os._exit``), not a traceback and then JAX's abort at the
    shutdown barrier that the lost peer never reaches; ``--traceback`` prints it first."""
    import jax

    from hgrn_jax.training import watchdog
    from hgrn_jax.training.preemption import how_to_resume
    from hgrn_jax.training.workdir import resume_choice

    if _TRACEBACK.value:
        import traceback

        traceback.print_exception(error)
    watchdog.stop_after_collective_failure(
        error, jax.process_index(), how_to_resume(resume_choice(config))
    )
    raise AssertionError("unreachable: the process has exited")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options look like --config.key=value")
    cli.check_config_file()
    cli.check_overrides()
    shape_error = cli.config_shape_error(
        _CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    )
    if shape_error:
        cli.fail(shape_error)
    if not flags.FLAGS["verbosity"].present:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        _configure_jax()
    except ValueError as error:  # a malformed environment variable, named
        cli.fail(str(error))
    import jax

    from hgrn_jax.training import podlog

    primary = jax.process_index() == 0
    podlog.quiet_secondary_processes(jax.process_index())

    from hgrn_jax.data.grain_pipeline import InputWorkerLost
    from hgrn_jax.training.agreement import StoppedByAnotherProcess
    from hgrn_jax.training.checkpoint import CheckpointError, quiet_echoes_of_a_full_disk
    from hgrn_jax.training.loop import NonFiniteLossError, train_and_evaluate
    from hgrn_jax.training.preemption import PREEMPTED_EXIT_CODE, Preempted
    from hgrn_jax.training.workdir import WorkdirError

    if not _TRACEBACK.value:
        quiet_echoes_of_a_full_disk()

    user_errors = (
        ValueError,
        OSError,
        KeyError,
        AttributeError,
        WorkdirError,
        CheckpointError,
        StoppedByAnotherProcess,
        InputWorkerLost,
    )
    config = _CONFIG.value
    try:
        results = train_and_evaluate(
            config, _WORKDIR.value, on_checked=cli.quote_the_right_paper_number
        )
    except Preempted as preempted:
        if primary:
            print(str(preempted), file=sys.stderr, flush=True)
        if preempted.signal_name == "SIGINT":
            _end_by_sigint()
        sys.exit(PREEMPTED_EXIT_CODE)
    except NonFiniteLossError as error:
        if _TRACEBACK.value:
            raise
        cli.fail(str(error), EXIT_NONFINITE)
    except user_errors as error:
        if _pod_collective_failure(error):
            _stop_on_lost_peer(error, config)
        if _TRACEBACK.value:
            raise
        cli.fail(
            f"{type(error).__name__}: {error}{cli.where_raised(error)} (rerun with --traceback "
            "for details)"
        )
    except jax.errors.JaxRuntimeError as error:
        if not _pod_collective_failure(error):
            raise
        _stop_on_lost_peer(error, config)
    from hgrn_jax.training.watchdog import shut_down_distributed

    shut_down_distributed()
    if not primary:
        return
    print(cli.final_line(results), flush=True)


STOPPED_AT_ONCE = (
    "{}: stopped at once; the last complete checkpoint is kept, and running the same command "
    "again resumes from it"
)
"""What a Ctrl-C or SIGTERM outside the training loop prints (in it, the run saves first)."""


def _terminated_at_once(signum: int, frame) -> NoReturn:
    """SIGTERM's handler until the run installs its own (loading the config, importing JAX)
    and after the training loop: one line, then SIGTERM's default action (status 143), as
    without the handler, which said nothing."""
    del signum, frame
    os.write(2, (STOPPED_AT_ONCE.format("terminated (SIGTERM)") + "\n").encode())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM)  # not reached


def _wants_traceback() -> bool:
    if flags.FLAGS.is_parsed():
        return _TRACEBACK.value
    return any(arg in ("--traceback", "-traceback") for arg in sys.argv[1:])


def run() -> None:
    """The command line: a Ctrl-C at any moment outside the training loop, even while the
    config file loads and JAX is imported (a traceback then), stops at once with one line."""
    cli.show_warnings_on_one_line()
    signal.signal(signal.SIGTERM, _terminated_at_once)
    try:
        app.run(main, flags_parser=cli.parse_flags)
    except SystemExit as exiting:
        if isinstance(exiting.code, int) and exiting.code != 0:
            cli.exit_past_stuck_threads(exiting.code)
        raise
    except KeyboardInterrupt:
        if _wants_traceback():
            raise
        print(STOPPED_AT_ONCE.format("interrupted (SIGINT)"), file=sys.stderr, flush=True)
        _end_by_sigint()
    except Exception as error:  # --traceback, or an error no one-line message covers
        import traceback

        traceback.print_exception(error)
        cli.exit_past_stuck_threads(1)  # a failed save's threads would hold the exit 5 min
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
