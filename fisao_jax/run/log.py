"""What a run says and records: a quiet console, a log file, metrics.jsonl + TensorBoard,
and the guard that stops a run after too many non-finite updates in a row."""
from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Optional

from fisao_jax import hosts

LOG_FILE = "log.txt"


def configure_logging(workdir: Optional[pathlib.Path], console_level: int = logging.WARNING) -> None:
    """Library chatter (orbax, absl, jax INFO lines) goes to `workdir/log.txt`; the console
    shows WARNING and above (progress bars and result tables are printed, not logged).
    `console_level=logging.INFO` (main's --verbosity=0) brings the INFO lines back."""
    from absl import logging as absl_logging

    absl_logging.use_absl_handler()
    handler = absl_logging.get_absl_handler()
    handler.setLevel(console_level)
    absl_logging.set_verbosity(logging.INFO if console_level <= logging.INFO else absl_logging.WARNING)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if workdir is not None:
        # one log file per process: log.txt (process 0), log.process<k>.txt
        path = (pathlib.Path(workdir) / LOG_FILE.replace(".txt", hosts.log_suffix() + ".txt")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(isinstance(h, logging.FileHandler) and pathlib.Path(h.baseFilename) == path for h in root.handlers):
            file_handler = logging.FileHandler(path)
            file_handler.setLevel(logging.INFO)
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(file_handler)
        # absl's own handler filters by its verbosity: keep INFO flowing to the file handler
        absl_logging.set_verbosity(absl_logging.INFO)
        handler.setLevel(console_level)


class NonFiniteGuard:
    """Counts skipped (non-finite) updates; raises after `max_in_row` consecutive ones."""

    def __init__(self, max_in_row: int, total: int = 0, streak: int = 0):
        self.max_in_row, self.total, self.streak = max_in_row, total, streak

    def record(self, finite: bool, iteration: int) -> None:
        if finite:
            self.streak = 0
            return
        self.total += 1
        self.streak += 1
        if self.streak >= self.max_in_row:
            raise FloatingPointError(
                f"{self.streak} non-finite updates in a row (last at iteration {iteration}); stopping. "
                f"Lower the learning rate, check the reward baseline (baseline.json) or raise "
                f"train.max_nonfinite_in_row.")


class MetricsLog:
    """metrics.jsonl + TensorBoard (process 0 writes; the others' writes do nothing). On resume,
    lines after the restored step are dropped, so a resumed run's file equals an uninterrupted
    run's."""

    def __init__(self, workdir: pathlib.Path, resume_step: int, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.active = hosts.is_primary()
        self.writer = None
        if not self.active:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
            except ImportError:
                pass

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": step, **metrics}, sort_keys=True) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if math.isfinite(v):  # e.g. val/var_explained with constant returns is NaN
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
