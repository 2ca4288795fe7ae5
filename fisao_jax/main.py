"""Entry point: `python -m fisao_jax.main --config=configs/tiny.py --workdir=runs/tiny`.

Flags:
  --config      an ml_collections config file, optionally with a variant
                (`configs/tiny.py:margin5`); override fields with --config.ppo.lr=1e-5 etc. Its
                `method` field picks the trainer: 'fisao' (default), 'csr' or 'vigor'.
  --workdir     where everything of the run goes; a run resumes from its newest checkpoint.
  --dry_run     build the model abstractly (no weights), trace rollout and PPO update with
                jax.eval_shape and print per-device memory for the configured mesh.
  --verbosity   absl's flag: the console shows progress bars, results and warnings; pass
                --verbosity=0 to see the libraries' INFO lines there too (they always go to
                <workdir>/log.txt).

More than one host (one process per host, the same command on each; see README):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=K  (or $JAX_COORDINATOR_ADDRESS,
                $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); on a TPU pod slice nothing is needed.
  --distributed_timeout  seconds to reach the coordinator before failing (300).
"""
from __future__ import annotations

import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from fisao_jax import hosts
from fisao_jax.config_checks import ConfigError, validate_config
from fisao_jax.methods import method_module
from fisao_jax.run.log import configure_logging

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")

_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Trace shapes and print memory; load no weights.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (several hosts).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (several hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (several hosts).")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to reach the coordinator.")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.get("workdir")
    try:  # before anything touches a device
        hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _TIMEOUT.value)
    except hosts.HostsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 0
    configure_logging(pathlib.Path(workdir) if workdir and not _DRY_RUN.value else None,
                      logging.INFO if verbose else logging.WARNING)
    try:
        validate_config(config)
        method = method_module(config.method)
        method.validate(config)
        if _DRY_RUN.value:
            from fisao_jax.dry_run import dry_run

            dry_run(config)
            return 0
        if not workdir:
            print("error: pass --workdir (or set config.workdir)", file=sys.stderr)
            return 2
        method.train(config, workdir)
    except ConfigError as e:
        print(f"error{_where()}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if hosts.count() > 1:  # say which process failed; the others stop at their next collective
            print(f"error{_where()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    return 0


def _where() -> str:
    return f" on process {hosts.index()} of {hosts.count()}" if hosts.count() > 1 else ""


if __name__ == "__main__":
    app.run(main)
