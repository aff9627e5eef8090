"""Accuracy over seeds: train one model with several seeds and print mean and spread.

Each seed is a separate ``python -m fmnist_keras.train`` run (its own run
directory under ``--out-dir``); the script then reads every ``metrics.json``
and prints test accuracy, macro-F1, best epoch, the model's training wall
time and the whole command's (start-up and report included) per seed, with
the mean and the spread (sample standard deviation, and max - min).
Extra arguments after ``--`` go to ``train`` unchanged, except the flags the
script sets for each seed itself (``--model``, ``--seed``, ``--out-dir``,
``--run-name``, ``--overwrite``, ``--resume``), which are refused. Each seed's
log, ``OUT_DIR/MODEL-seedS.log``, starts with a stamped line naming its
command; an existing file there without that line is never replaced, nor is
a run directory ``OUT_DIR/MODEL-seedS`` without such a log beside it. Each
seed is given once. On Ctrl-C or SIGTERM every ``train`` still running is
ended (a terminal's Ctrl-C reaches them too; the rest get SIGTERM) and
keeps its completed epochs. On
Linux a ``train`` also gets SIGTERM when the script itself is killed
(SIGKILL, the out-of-memory killer), so that no seed goes on training alone.
A closed terminal's SIGHUP reaches the script and its trains alike (one
process group): each ends at once, with its completed epochs kept.

Usage:
    python benchmarks/seeds.py --model cnn --seeds 42 1 2 --out-dir runs/seeds
    python benchmarks/seeds.py --model cnn --seeds 42 1 2 --jobs 3 -- --epochs 20   # GPU: in parallel

On a 2-core CPU keep ``--jobs 1`` (the default): parallel runs only share the
cores. Writes the table as JSON with ``--json``.
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import outputs  # benchmarks/ is on sys.path when a script there runs
from children import last_line, start_child, stopping
from fmnist_keras.cli import in_range, one_line
from fmnist_keras.config import MODEL_NAMES, RANGES
from fmnist_keras import interrupts
from fmnist_keras.rundir import RunDir, RunDirError, exists_or_link

# train's flags that this script sets for each seed, and reads the results of.
OWN_TRAIN_FLAGS = ("--model", "--seed", "--out-dir", "--run-name", "--overwrite", "--resume")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=MODEL_NAMES, help="model to train (default: cnn)")
    parser.add_argument("--seeds", type=in_range(*RANGES["seed"]), nargs="+", default=[42, 1, 2],
                        help="seeds (default: 42 1 2)")
    parser.add_argument("--out-dir", default="runs/seeds", help="where the runs go (default: runs/seeds)")
    parser.add_argument("--jobs", type=in_range(int, 1, 64), default=1, help="runs at a time (default: 1)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the table as JSON (a new file, or an earlier result, which is replaced)")
    parser.add_argument("train_args", nargs="*", help="arguments passed on to train (after --), except those this "
                        f"script sets itself ({', '.join(OWN_TRAIN_FLAGS)})")
    args = parser.parse_args(argv)
    own = [flag for flag in args.train_args  # train takes any unambiguous start of a flag, too: --out, --over
           if flag.startswith("--") and len(flag.split("=")[0]) > 2
           and any(ours.startswith(flag.split("=")[0]) for ours in OWN_TRAIN_FLAGS)]
    if own:
        parser.error(f"{own[0]} after -- would change what this script reads back (it sets "
                     f"{', '.join(OWN_TRAIN_FLAGS)} itself); use its own --model, --seeds and --out-dir instead")
    helps = [flag for flag in args.train_args if flag == "-h" or (len(flag) > 2 and "--help".startswith(flag))]
    if helps:
        parser.error(f"{helps[0]} after -- makes train print its help and train nothing; see python -m "
                     f"fmnist_keras.train --help for train's flags")
    repeated = outputs.repeated_seeds_line(args.seeds)
    if repeated:
        parser.error(repeated)
    try:
        RunDir.check_out_dir(args.out_dir)
        for seed in args.seeds:  # every log and run directory, before any run starts
            check_replaceable(log_path(args, seed), Path(args.out_dir) / run_name(args.model, seed))
    except (RunDirError, OSError) as error:
        parser.error(one_line(error))
    return args


def check_replaceable(log: Path, run: Path) -> None:
    """Refuse, as OSError, a seed's log or run that this script may not replace: a log a benchmark did not write,
    or a run directory without this script's log beside it (a ``train`` run named like a seed's, a user's
    directory: ``train --overwrite`` would replace a run of train's own)."""
    outputs.check_log(log)
    if exists_or_link(run) and not log.exists():
        raise OSError(f"{run} exists and there is no {log.name} beside it, so it is not known to be a run seeds.py "
                      f"made and is left alone; move it away or choose another --out-dir")


def log_ends_with(path: Path) -> str:
    """The last line with text in the seed's log ``path``, or what kept it from being read."""
    try:
        with open(path, "rb") as file:
            return last_line(file) or "its log is empty"
    except OSError as error:
        return f"its log cannot be read ({error.strerror or error})"


def run_name(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def metrics_path(args, seed: int) -> Path:
    """The ``metrics.json`` the seed's ``train`` writes as it finishes."""
    return Path(args.out_dir) / run_name(args.model, seed) / args.model / "metrics.json"


def file_version(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` (device, inode, modification time in ns), None when none is: a file replaced
    since has another, whatever the clocks of this machine and of the file system say."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def log_path(args, seed: int) -> Path:
    """Where the seed's ``train`` writes its output: ``OUT_DIR/MODEL-seedS.log``."""
    return Path(args.out_dir) / f"{run_name(args.model, seed)}.log"


def launch(args, seed: int) -> subprocess.Popen:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "fmnist_keras.train", "--model", args.model, "--seed", str(seed),
        "--out-dir", str(out), "--run-name", run_name(args.model, seed), "--overwrite",
        *args.train_args,
    ]
    with outputs.open_log(log_path(args, seed), command) as log:
        print("$", shlex.join(command), flush=True)
        return start_child(command, stdout=log, stderr=subprocess.STDOUT)


def main(argv=None) -> int:
    args = parse_args(argv)
    with stopping({}) as running:  # seed -> its train, while it runs
        return _run_seeds(args, running)


def _run_seeds(args, running: dict[int, subprocess.Popen]) -> int:
    pending, failed = list(args.seeds), []
    started, process_wall = {}, {}  # the whole `train` command, start-up and report included
    before = {}  # each seed's metrics.json as its train started (file_version): the train must replace it
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            try:
                with interrupts.deferred():  # a train started is a train known to stopping()
                    before[seed] = file_version(metrics_path(args, seed))
                    running[seed], started[seed] = launch(args, seed), time.perf_counter()
            except OSError as error:  # its log cannot be written
                failed.append(seed)
                print(f"seed {seed}: not started: {error}", file=sys.stderr)
        time.sleep(1)
        for seed, process in list(running.items()):
            if process.poll() is not None:
                process_wall[seed] = time.perf_counter() - started[seed]
                del running[seed]
                if process.returncode:
                    failed.append(seed)
                    log = log_path(args, seed)
                    print(one_line(f"seed {seed}: train exited with {process.returncode}: {log_ends_with(log)} (see "
                                   f"{log})"), file=sys.stderr)
    rows = []
    for seed in args.seeds:
        if seed in failed:  # its metrics.json, if any, is an earlier run's
            continue
        metrics_file, log = metrics_path(args, seed), log_path(args, seed)
        if before[seed] is not None and file_version(metrics_file) == before[seed]:  # train writes it anew
            failed.append(seed)
            print(one_line(f"seed {seed}: train ended without writing {metrics_file} (the one there is an earlier "
                           f"run's); see {log}"), file=sys.stderr)
            continue
        try:
            m = json.loads(metrics_file.read_text())
            rows.append({
                "seed": seed, "test_acc": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
                "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"], "wall_time_s": m.get("wall_time_s"),
                "seconds_per_epoch": m["seconds_per_epoch"], "device": m.get("device"),
                "command_wall_s": round(process_wall.get(seed, 0.0), 1),
            })
        except (OSError, ValueError, KeyError, TypeError) as error:  # train said it finished; its file disagrees
            failed.append(seed)
            print(one_line(f"seed {seed}: cannot read {metrics_file} ({error!r}); see {log}"), file=sys.stderr)
    print(f"\n{args.model}: {len(rows)} of {len(args.seeds)} seeds finished")
    print(f"{'seed':>6}{'test acc':>10}{'macro-F1':>10}{'best':>6}{'epochs':>8}{'s/epoch':>9}{'train s':>9}{'command s':>11}")
    for r in rows:
        print(f"{r['seed']:>6}{r['test_acc']:>10.4f}{r['macro_f1']:>10.4f}{'-' if r['best_epoch'] is None else r['best_epoch']:>6}{r['epochs_run']:>8}"
              f"{r['seconds_per_epoch']:>9.1f}{r['wall_time_s'] or 0:>9.0f}{r['command_wall_s']:>11.0f}")
    summary = {}
    if rows:
        accs = [r["test_acc"] for r in rows]
        summary = {
            "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs),
        }
        print(f"mean {summary['mean']:.4f}  std {summary['std']:.4f}  range {summary['min']:.4f}-{summary['max']:.4f}")
    if args.json and rows:
        outputs.write_json(args.json, {"model": args.model, "rows": rows, "summary": summary})
    elif args.json:  # an earlier result there stays as it was
        print(f"{one_line(args.json)} is not written: no seed finished", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "seeds.py"))
