"""The summary of one ``gpu_check.sh`` run, as Markdown on stdout.

Reads what the script left in its output directory: ``steps.tsv`` (name,
start, end, limit, exit status of every step), ``env.log``,
``gpu-memory.log`` (the nvidia-smi sampler; absent on a dry run), the
benchmarks' JSON and the run directories' ``metrics.json``.

Usage:
    python benchmarks/gpu_summary.py gpu-results > gpu-results/summary.md
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import contextlib
import json
import math
import os
import pathlib
import sys

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.cli import escape_unencodable_output, non_empty_path
from fmnist_keras.config import load_config
from fmnist_keras.rundir import (MAX_RUN_FILE_BYTES, RunDirError, is_epoch_or_none, read_run_text,
                                 refuse_json_constant)

# Step -> a piece of its command line, to find its processes in nvidia-smi's list.
PROCESS_KEYS = {
    "overhead": "overhead.json", "bench": "bench.json", "syncs": "syncs.json", "jax": "bench-jax.json",
    "train-default": "--run-name default", "train-cnn-large": "--run-name cnn-large",
    "train-cnn-b512": "--run-name cnn-b512", "preflight": "--run-name preflight",
}


# What gpu_check.sh leaves in its output directory; a directory with none of it is not one.
CHECK_FILES = ("steps.tsv", "env.log", "gpu-memory.log", "overhead.json", "bench.json", "bench-jax.json", "syncs.json",
               "runs")


def read_text(path: pathlib.Path) -> str:
    """The text of one file the check wrote, "" when it is missing; a FIFO, a device or a file over 16 MiB is one
    line, never read (a FIFO would wait for a writer, /dev/zero would fill the memory)."""
    if not os.path.lexists(path):
        return ""
    fix = "gpu_check.sh writes regular files there: put its own back, or delete this one to summarise the rest"
    try:
        return read_run_text(path, "a file gpu_check.sh writes", fix)
    except RunDirError as error:
        raise SystemExit(f"error: {error}") from None
    except UnicodeDecodeError:  # bytes the check never writes: read them as the replacement character
        with open(path, "rb") as file:
            return file.read(MAX_RUN_FILE_BYTES).decode(errors="replace")
    except OSError as error:
        raise SystemExit(f"error: cannot read {path} ({error.strerror or error}); {fix}") from None


def _finite(text: str) -> float:
    """A JSON number the benchmarks write: finite (Python's json reads 1e999 as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def read_steps(out: pathlib.Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, start, end, limit, rc = line.split("\t")
            steps.append({"name": name, "start": _finite(start), "end": _finite(end), "limit": int(limit),
                          "rc": int(rc)})
        except ValueError:
            raise SystemExit(f"error: {path}, line {number}, is not 'name, start, end, limit, exit status' separated "
                             f"by tabs ({line[:60]!r}); gpu_check.sh writes each step's line as it ends: restore the "
                             f"file, or delete that line to summarise the rest") from None
    return sorted(steps, key=lambda s: s["start"])


def read_memory(out: pathlib.Path):
    """(time, MiB used on the GPU, % utilisation or None) samples and (pid, MiB, command line) process samples."""
    totals, processes = [], []
    for line in read_text(out / "gpu-memory.log").splitlines():
        parts = line.split(" ", 3)
        try:
            if parts[0] == "T" and len(parts) >= 3:
                utilisation = _finite(parts[3]) if len(parts) > 3 else None
                totals.append((_finite(parts[1]), _finite(parts[2]), utilisation))
            elif parts[0] == "P" and len(parts) >= 3:
                processes.append((parts[1], _finite(parts[2]), parts[3] if len(parts) > 3 else ""))
        except ValueError:
            continue
    return totals, processes


def peak_memory(step, totals, processes):
    """Peak MiB of the step's own processes (None if unseen), of the whole GPU during the step, and
    the GPU's mean % utilisation during the step (None if unsampled)."""
    window = [(mib, use) for t, mib, use in totals if step["start"] <= t <= step["end"]]
    key = PROCESS_KEYS.get(step["name"]) or ("--run-name " + step["name"].removeprefix("devices-"))
    own = [mib for _pid, mib, command in processes if key in command]
    uses = [use for _mib, use in window if use is not None]
    return ((max(own) if own else None), (max(mib for mib, _use in window) if window else None),
            (sum(uses) / len(uses) if uses else None))


def read_history(model_dir: pathlib.Path) -> list[dict]:
    """The epochs of history.csv as dicts of floats; rows that do not parse are left out.

    Not ``fmnist_keras.engine.callbacks.read_history``, which imports Keras and
    refuses a damaged file: a run stopped at its limit may have cut its last line.
    """
    lines = read_text(model_dir / "history.csv").splitlines()
    rows = []
    for line in lines[1:]:
        try:
            rows.append(dict(zip(lines[0].split(","), map(_finite, line.split(",")))))
        except ValueError:
            continue
    return rows


def fmt(value, spec="") -> str:
    return "-" if value is None else format(value, spec)


def read_json(path: pathlib.Path) -> dict:
    """A JSON object that the check wrote; a file cut short (the step's time limit) or not an object is one line."""
    try:
        data = json.loads(read_text(path), parse_float=_finite, parse_constant=refuse_json_constant)
    except (ValueError, RecursionError) as error:
        raise SystemExit(f"error: {path} cannot be read as JSON ({error}); its step may have been stopped while "
                         f"writing it: delete it to summarise the rest, or run that step again") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} holds {type(data).__name__}, not the JSON object its step writes; delete "
                         f"it to summarise the rest")
    return data


@contextlib.contextmanager
def reading(path: pathlib.Path):
    """Around the use of one file's JSON: a key it lacks, or a value of another form, is one line naming the file."""
    try:
        yield
    except UnicodeError:  # the summary's own output, not the file
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        what = f"lacks the key {error}" if isinstance(error, KeyError) else f"holds a value of another form ({error})"
        raise SystemExit(f"error: {path} {what}; it was not written by this version of its benchmark: run that step "
                         f"again, or delete the file to summarise the rest") from None


def print_section(path: pathlib.Path, show) -> None:
    """``show`` the JSON object of a benchmark's file, if the check wrote one (:func:`read_json`, :func:`reading`)."""
    if path.exists():
        with reading(path):
            show(read_json(path))


def print_environment(out: pathlib.Path) -> None:
    print("| | |\n| --- | --- |")
    env = out / "env.log"
    for line in read_text(env).splitlines() or [f"env: {'an empty' if os.path.lexists(env) else 'no'} env.log"]:
        key, _, value = line.partition(":")
        print(f"| {key.strip()} | {value.strip()} |")


def print_steps(out: pathlib.Path, steps: list[dict]) -> None:
    totals, processes = read_memory(out)
    print("| step | exit | seconds | limit s | peak MiB, its processes | peak MiB, whole GPU | GPU use, mean % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step in steps:
        own, whole, use = peak_memory(step, totals, processes)
        status = "timeout" if step["rc"] == 124 else str(step["rc"])
        seconds = step["end"] - step["start"]  # the wall clock's: below 0 where it was set back during the step
        print(f"| {step['name']} | {status} | {fmt(seconds if seconds >= 0 else None, '.0f')} | {step['limit']} | "
              f"{fmt(own, '.0f')} | {fmt(whole, '.0f')} | {fmt(use, '.0f')} |")


def print_overhead(data: dict) -> None:
    print(f"\n## Host ms/step at batch {data['batch_size']} ({data['device']}, keras {data['keras']})\n")
    print("| model | stock ms/step | fast ms/step | torch ms/step | fast/torch | peak MiB fast / torch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in data["rows"]:
        print(f"| {r['model']} | {fmt(r.get('stock_ms'), '.2f')} | {r['fast_ms']:.2f} | {r['torch_ms']:.2f} | "
              f"{r['fast_over_torch']:.2f}x | {fmt(r.get('fast_peak_mb'), '.0f')} / "
              f"{fmt(r.get('torch_peak_mb'), '.0f')} |")


def print_bench(name: str, data: dict) -> None:
    torch_version = data.get("versions", {}).get("torch")
    print(f"\n## Epoch benchmark, {data['backend']} ({name}: {data['num_train']} images, batch "
          f"{data['batch_size']}, {data['rounds']} rounds, {data['device']}, keras {data['keras']}"
          f"{f', torch {torch_version}' if torch_version else ''})\n")
    print("| model | path | s/epoch | train img/s | peak MiB | test acc | keras/torch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in data["rows"]:
        ratio = f"{r['keras_over_torch']:.2f}x" if "keras_over_torch" in r else ""
        print(f"| {r['model']} | {r['path']} | {r['s_per_epoch']:.2f} | {r['train_img_s']:.0f} | "
              f"{fmt(r['peak_mb'], '.0f')} | {r['test_acc']:.4f} | {ratio} |")


def print_syncs(data: dict) -> None:
    if data.get("not_counted"):  # syncs.py without a CUDA device (a dry run)
        print(f"\n## Synchronisations per training step\n\nNot counted: {data['not_counted']}.")
        return
    print(f"\n## Synchronisations per training step ({data['device']}, keras {data['keras']})\n")
    print("| model | path | per step | where (per step) |")
    print("| --- | --- | ---: | --- |")
    for r in data["rows"]:
        where = "; ".join(f"{place} {n:g}" for place, n in r["where"].items())
        print(f"| {r['model']} | {r['path']} | {r['per_step']:g} | {where or '-'} |")


def run_row(model_dir: pathlib.Path, config, seconds: dict) -> str:
    """The table row of one model of a run, of its checked ``config`` (a TrainConfig); a damaged ``metrics.json`` is
    the caller's line (:func:`reading`)."""
    run = model_dir.parent.name
    metrics = model_dir / "metrics.json"
    if metrics.exists():
        m = read_json(metrics)
        validation = fmt(m.get("validation", {}).get("accuracy"), ".4f")
        test = fmt(m.get("test", {}).get("accuracy"), ".4f")
    else:  # stopped before the end (its limit): what history.csv holds, validation without test-time augmentation
        history = read_history(model_dir)
        m = {"model": config.model, "epochs_run": len(history)}
        scores = [row["val_accuracy"] for row in history if "val_accuracy" in row]
        validation = f"{max(scores):.4f} (1 view)" if scores else "-"
        test = "stopped"
    for name in ("epochs_run", "best_epoch"):
        if not is_epoch_or_none(m.get(name)):  # a ValueError is a damaged file's line (reading)
            raise ValueError(f"{name} {m.get(name)!r} is not an epoch count")
    off = [piece for piece, state in (m.get("fast_path") or {}).items() if state != "on"]
    reports = sorted(p.name for p in model_dir.iterdir() if p.name.startswith("report"))
    return (f"| {run} | {m.get('model')} | {m.get('device', '-')} | {config.batch_size} | "
            f"{m.get('epochs_run')} ({fmt(m.get('best_epoch'))}) | {fmt(m.get('seconds_per_epoch'))} | "
            f"{fmt(m.get('train_time_s'))} | {fmt(seconds.get(run), '.0f')} | {validation} | {test} | "
            f"{fmt(m.get('training_data_on_device'))} | {', '.join(off) or '-'} | {', '.join(reports) or '-'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="gpu-results", type=non_empty_path,  # "" would be "."
                        help="the output directory of benchmarks/gpu_check.sh (default: gpu-results)")
    out = pathlib.Path(parser.parse_args(argv).out)
    escape_unencodable_output()  # a device or run name that the terminal's encoding lacks
    if not out.is_dir():
        parser.error(f"{out} is not a directory; pass the output directory of benchmarks/gpu_check.sh")
    if not any(os.path.lexists(out / name) for name in CHECK_FILES):
        parser.error(f"{out} holds none of the files gpu_check.sh writes ({', '.join(CHECK_FILES)}); pass its "
                     f"output directory")
    steps = read_steps(out)
    print(f"# GPU check: {out}\n\n## Machine and versions\n")
    print_environment(out)
    print("\n## Steps\n")
    print_steps(out, steps)
    print_section(out / "overhead.json", print_overhead)
    for name in ("bench.json", "bench-jax.json"):
        print_section(out / name, lambda data, name=name: print_bench(name, data))
    print_section(out / "syncs.json", print_syncs)

    print("\n## Training runs\n")
    print("The whole command's seconds are its step's (every model of the run, start-up and reports included).\n")
    print("| run | model | device | batch | epochs run (best) | s/epoch | training s | whole command s | "
          "validation acc | test acc | data on device | fast-path pieces not on | report files |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    seconds = {step["name"].removeprefix("train-").removeprefix("devices-"): step["end"] - step["start"]
               for step in steps}
    for model_dir in sorted(p.parent for p in (out / "runs").glob("*/*/config.json")):
        if model_dir.parent.is_symlink():  # "latest" points at a run listed under its own name
            continue
        try:
            config = load_config(model_dir / "config.json")
        except RunDirError as error:  # a damaged one is its own line, as every file's here
            raise SystemExit(f"error: {error}") from None
        with reading(model_dir / "metrics.json"):
            print(run_row(model_dir, config, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "gpu_summary.py"))
