"""The synthetic-world experiments: FiSAO against the SFT model, its ablations (paper
Tables 4 and 5) and the sibling methods CSR and ViGoR, several seeds each.

    python benchmarks/world_experiments.py --out runs/world_experiments --tables methods ablations margin

Every row is one `python -m fisao_jax.main` run per seed (its own workdir under --out, kept,
so an interrupted sweep resumes and `--report_only` re-prints the tables). All runs share
the cached pretrained world (built by the first run if missing), its calibration
(`baseline.json` of the first run is passed to the others) and the same held-out
evaluation scenes; `--seed` changes the PPO / DPO / SFT sampling and LoRA init only. The
"SFT" row is the "before" evaluation of the FiSAO runs (greedy, so the same every seed).

`--jobs 2` runs two trainings at once, each pinned to its own core: twice the throughput on
a 2-core machine, but per-run wall times then count one core each. Outputs in --out:
`results.json` (every run's metrics), `tables.md` (what is printed) and
`world_experiments.png` (CHAIR_i and recall per row).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import queue
import subprocess
import sys
import time
from typing import Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# table -> [(row, config file, extra flags)]; "SFT" rows take the FiSAO runs' "before".
TABLES = {
    "fisao": [
        ("SFT", None, []),
        ("FiSAO", "configs/tiny.py", []),
    ],
    "methods": [
        ("SFT", None, []),
        ("FiSAO", "configs/tiny.py", []),
        ("CSR", "configs/tiny.py:csr", []),
        ("CSR (mean response score)", "configs/tiny.py:csr", ["--config.csr.response_score=mean"]),
        ("ViGoR", "configs/tiny.py:vigor", []),
    ],
    "ablations": [
        ("SFT", None, []),
        ("FiSAO (token-level reward)", "configs/tiny.py", []),
        ("sentence-level reward", "configs/tiny.py:sentence", []),
        ("KL only", "configs/tiny.py:kl_only", []),
    ],
    "margin": [
        ("SFT", None, []),
        ("margin 5", "configs/tiny.py:margin5", []),
        ("margin 10 (default)", "configs/tiny.py", []),
        ("margin 20", "configs/tiny.py:margin20", []),
    ],
}
METRICS = ("CHAIRs", "CHAIRi", "Recall", "Len", "degenerate")


def degenerate_percent(captions: list[str]) -> float:
    """% of captions that loop (a word three times in a row) or were cut off at the token
    budget (no final period): the world's SFT captions never do either."""
    def bad(text: str) -> bool:
        w = text.split()
        return any(w[i] == w[i + 1] == w[i + 2] for i in range(len(w) - 2)) or not text.rstrip().endswith(".")
    return 100.0 * sum(map(bad, captions)) / max(len(captions), 1)


def run_name(config: str, extra: list[str]) -> str:
    """A workdir-safe name for one (config, flags) setting; the same setting in two tables
    (FiSAO = margin 10) is run once."""
    name = pathlib.Path(config).stem
    for flag in extra:
        name += "__" + flag.lstrip("-").replace("config.", "").replace("=", "-").replace(".", "_")
    return name


def _command(config: str, extra: list[str], workdir: pathlib.Path, seed: int,
             baseline: Optional[pathlib.Path]) -> list[str]:
    cmd = [sys.executable, "-m", "fisao_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.seed={seed}", *extra]
    if baseline is not None:
        cmd.append(f"--config.reward.baseline_path={baseline}")
    return cmd


def run_all(out: pathlib.Path, settings: list[tuple[str, list[str]]], seeds: list[int], jobs: int,
            common: list[str]) -> None:
    """Run every (setting, seed) whose workdir has no summary.json yet, `jobs` at a time;
    `common` flags go to every run (after the setting's own)."""
    pending = [(cfg, extra, seed) for seed in seeds for cfg, extra in settings
               if not (out / f"{run_name(cfg, extra)}_s{seed}" / "summary.json").exists()]
    if not pending:
        return
    baseline = out / "baseline.json"
    cores = sorted(os.sched_getaffinity(0))
    free_cores: queue.Queue = queue.Queue()
    for slot in range(jobs):
        free_cores.put(cores[slot % len(cores)])

    def run_one(cfg: str, extra: list[str], seed: int) -> None:
        wd = out / f"{run_name(cfg, extra)}_s{seed}"
        cmd = _command(cfg, extra + common, wd, seed, baseline if baseline.exists() else None)
        # One core per run when several run at once: XLA's thread pool follows the affinity mask.
        core = free_cores.get()
        pin = (lambda: os.sched_setaffinity(0, [core])) if jobs > 1 else None
        t0 = time.time()
        try:
            with open(str(wd) + ".log", "w") as log:
                rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin).returncode
        finally:
            free_cores.put(core)
        wall = time.time() - t0
        pathlib.Path(str(wd) + ".wall").write_text(f"{wall:.1f}\n")
        status = "ok" if rc == 0 else f"FAILED rc={rc} (see {wd}.log)"
        print(f"{wd.name}: {status}, {wall:.0f} s", flush=True)
        if not baseline.exists() and (wd / "baseline.json").exists():
            baseline.write_text((wd / "baseline.json").read_text())

    # The first run alone: it builds or loads the world and writes the shared baseline.json.
    if not baseline.exists():
        run_one(*pending.pop(0))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for done in [pool.submit(run_one, *p) for p in pending]:
            done.result()


def collect(out: pathlib.Path, table: str, seeds: list[int]) -> list[dict]:
    """Per row: metric arrays over the seeds that finished, and the mean wall time."""
    rows = []
    for name, cfg, extra in TABLES[table]:
        source = ("configs/tiny.py", []) if cfg is None else (cfg, extra)
        vals, walls, used = [], [], []
        for seed in seeds:
            wd = out / f"{run_name(*source)}_s{seed}"
            if not (wd / "summary.json").exists():
                continue
            summary = json.loads((wd / "summary.json").read_text())
            metrics = dict(summary["before" if cfg is None else "after"])
            evals = ["eval_before.json"] if cfg is None else sorted(
                (p.name for p in wd.glob("eval_after_*.json")), key=lambda n: int(n[len("eval_after_"):-5]))
            captions = json.loads((wd / evals[-1]).read_text())["captions"]
            metrics["degenerate"] = degenerate_percent([c["caption"] for c in captions])
            vals.append([float(metrics[k]) for k in METRICS])
            wall = pathlib.Path(str(wd) + ".wall")
            if cfg is not None and wall.exists():
                walls.append(float(wall.read_text()))
            used.append(seed)
        if vals:
            rows.append({"row": name, "config": cfg, "flags": extra, "seeds": used,
                         "values": np.asarray(vals), "wall_s": float(np.mean(walls)) if walls else None})
    return rows


def markdown(rows: list[dict], with_wall: bool) -> str:
    """mean ± std over seeds; relative CHAIR_i change and recall change against the SFT row."""
    sft = next((r for r in rows if r["config"] is None), None)
    head = ["", "CHAIR_s", "CHAIR_i", "Recall", "words", "looping / cut off %", "ΔCHAIR_i vs SFT",
            "ΔRecall (pts)"]
    if with_wall:
        head.append("wall time / run (s)")
    lines = ["| " + " | ".join(head) + " | seeds |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        mu, sd = r["values"].mean(0), r["values"].std(0)
        cells = [r["row"]] + [f"{mu[i]:.1f} ± {sd[i]:.1f}" for i in range(len(METRICS))]
        if sft is not None and r is not sft:
            base = sft["values"].mean(0)
            cells += [f"{100 * (mu[1] - base[1]) / base[1]:+.0f}%", f"{mu[2] - base[2]:+.1f}"]
        else:
            cells += ["—", "—"]
        if with_wall:
            cells.append("—" if r["wall_s"] is None else f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + f" | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot(all_rows: dict[str, list[dict]], path: pathlib.Path) -> None:
    """CHAIR_i and recall (mean and per-seed points) for every row of every table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, chair, recall, seen = [], [], [], set()
    for table, rows in all_rows.items():
        for r in rows:
            setting = (r["config"], tuple(r["flags"]))
            if setting in seen:  # e.g. FiSAO = margin 10 = token-level reward: one bar
                continue
            seen.add(setting)
            labels.append(r["row"])
            chair.append(r["values"][:, 1])
            recall.append(r["values"][:, 2])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(labels) + 1.5), sharey=True)
    y = np.arange(len(labels))
    for ax, vals, title in ((axes[0], chair, "CHAIR_i (%) ↓"), (axes[1], recall, "Recall (%) ↑")):
        ax.barh(y, [v.mean() for v in vals], color=["0.6" if l == "SFT" else "C0" for l in labels])
        for i, v in enumerate(vals):
            ax.plot(v, np.full(len(v), i), "k.", ms=4)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle("Synthetic world, held-out scenes (bars: mean over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True, help="folder for the run workdirs and the tables")
    ap.add_argument("--tables", nargs="+", default=["methods", "ablations", "margin"], choices=list(TABLES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once, one core each when > 1")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. --set ppo.lr=1e-4 (repeatable)")
    ap.add_argument("--report_only", action="store_true", help="print the tables of the runs already in --out")
    a = ap.parse_args()
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    for o in a.overrides:
        if "=" not in o or o.startswith("="):
            ap.error(f"--set {o!r}: expected KEY=VALUE, e.g. ppo.lr=1e-4")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        settings = []
        for table in a.tables:
            for _, cfg, extra in TABLES[table]:
                if cfg is not None and (cfg, extra) not in settings:
                    settings.append((cfg, extra))
        if ("configs/tiny.py", []) in settings:   # its "before" is the SFT row: run it first
            settings.remove(("configs/tiny.py", []))
            settings.insert(0, ("configs/tiny.py", []))
        t0 = time.time()
        common = [f"--config.{o}" for o in a.overrides]
        run_all(out, settings, a.seeds, a.jobs, common)
        print(f"all runs: {time.time() - t0:.0f} s", flush=True)

    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cores": len(os.sched_getaffinity(0)),
            "jobs": None if a.report_only else a.jobs, "overrides": a.overrides, "python": platform.python_version(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    text = [f"machine: {info}", ""]
    all_rows = {}
    for table in a.tables:
        rows = collect(out, table, a.seeds)
        if not rows:
            continue
        all_rows[table] = rows
        text += [f"### {table}", "", markdown(rows, with_wall=table == "methods"), ""]
    report = "\n".join(text)
    print(report)
    (out / "tables.md").write_text(report)
    (out / "results.json").write_text(json.dumps(
        {"machine": info, "tables": {t: [{**r, "values": r["values"].tolist(), "metrics": METRICS} for r in rows]
                                     for t, rows in all_rows.items()}}, indent=1))
    if all_rows:
        plot(all_rows, out / "world_experiments.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
