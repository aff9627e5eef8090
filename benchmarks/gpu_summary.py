"""The summary of one ``gpu_check.sh`` run, as Markdown on stdout.

Reads what the script left in its output directory: ``steps.tsv`` (name,
start, end, limit, exit status of every step), ``env.log``,
``gpu-memory.log`` (the nvidia-smi sampler; absent on a dry run), the
benchmarks' JSON and the run directories' ``metrics.json``.

Usage:
    python benchmarks/gpu_summary.py gpu-results > gpu-results/summary.md
"""

from __future__ import annotations

import json
import pathlib
import sys

# Step -> a piece of its command line, to find its processes in nvidia-smi's list.
PROCESS_KEYS = {
    "overhead": "overhead.json", "bench": "bench.json", "syncs": "syncs.json", "jax": "bench-jax.json",
    "train-default": "--run-name default", "train-cnn-large": "--run-name cnn-large",
}


def read_steps(out: pathlib.Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, start, end, limit, rc = line.split("\t")
        steps.append({"name": name, "start": float(start), "end": float(end), "limit": int(limit), "rc": int(rc)})
    return sorted(steps, key=lambda s: s["start"])


def read_memory(out: pathlib.Path):
    """(time, MiB used on the GPU) samples and (pid, MiB, command line) process samples."""
    totals, processes = [], []
    path = out / "gpu-memory.log"
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        parts = line.split(" ", 3)
        try:
            if parts[0] == "T" and len(parts) >= 3:
                totals.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "P" and len(parts) >= 3:
                processes.append((parts[1], float(parts[2]), parts[3] if len(parts) > 3 else ""))
        except ValueError:
            continue
    return totals, processes


def peak_memory(step, totals, processes):
    """Peak MiB of the step's own processes (None if unseen) and of the whole GPU during the step."""
    window = [mib for t, mib in totals if step["start"] <= t <= step["end"]]
    key = PROCESS_KEYS.get(step["name"]) or ("--run-name " + step["name"].removeprefix("devices-"))
    own = [mib for _pid, mib, command in processes if key in command]
    return (max(own) if own else None), (max(window) if window else None)


def fmt(value, spec="") -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = pathlib.Path(argv[0] if argv else "gpu-results")
    print(f"# GPU check: {out}\n\n## Machine and versions\n")
    env = out / "env.log"
    print("| | |\n| --- | --- |")
    for line in env.read_text().splitlines() if env.exists() else ["env: no env.log"]:
        key, _, value = line.partition(":")
        print(f"| {key.strip()} | {value.strip()} |")
    print("\n## Steps\n")
    totals, processes = read_memory(out)
    print("| step | exit | seconds | limit s | peak MiB, its processes | peak MiB, whole GPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for step in read_steps(out):
        own, whole = peak_memory(step, totals, processes)
        status = "timeout" if step["rc"] == 124 else str(step["rc"])
        print(f"| {step['name']} | {status} | {step['end'] - step['start']:.0f} | {step['limit']} | "
              f"{fmt(own, '.0f')} | {fmt(whole, '.0f')} |")

    overhead = out / "overhead.json"
    if overhead.exists():
        data = json.loads(overhead.read_text())
        print(f"\n## Host ms/step at batch {data['batch_size']} ({data['device']}, keras {data['keras']})\n")
        print("| model | stock ms/step | fast ms/step | torch ms/step | fast/torch | peak MiB fast / torch |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in data["rows"]:
            print(f"| {r['model']} | {fmt(r.get('stock_ms'), '.2f')} | {r['fast_ms']:.2f} | {r['torch_ms']:.2f} | "
                  f"{r['fast_over_torch']:.2f}x | {fmt(r.get('fast_peak_mb'), '.0f')} / "
                  f"{fmt(r.get('torch_peak_mb'), '.0f')} |")

    for name in ("bench.json", "bench-jax.json"):
        path = out / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        print(f"\n## Epoch benchmark, {data['backend']} ({name}: {data['num_train']} images, batch "
              f"{data['batch_size']}, {data['rounds']} rounds, {data['device']})\n")
        print("| model | path | s/epoch | train img/s | peak MiB | test acc | keras/torch |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in data["rows"]:
            ratio = f"{r['keras_over_torch']:.2f}x" if "keras_over_torch" in r else ""
            print(f"| {r['model']} | {r['path']} | {r['s_per_epoch']:.2f} | {r['train_img_s']:.0f} | "
                  f"{fmt(r['peak_mb'], '.0f')} | {r['test_acc']:.4f} | {ratio} |")

    syncs = out / "syncs.json"
    if syncs.exists():
        data = json.loads(syncs.read_text())
        print(f"\n## Synchronisations per training step ({data['device']}, keras {data['keras']})\n")
        print("| model | path | per step | where (per step) |")
        print("| --- | --- | ---: | --- |")
        for r in data["rows"]:
            where = "; ".join(f"{place} {n:g}" for place, n in r["where"].items())
            print(f"| {r['model']} | {r['path']} | {r['per_step']:g} | {where or '-'} |")

    print("\n## Training runs\n")
    print("| run | model | device | epochs run | s/epoch | test acc | report files |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for metrics in sorted((out / "runs").glob("*/*/metrics.json")):
        if metrics.parent.parent.is_symlink():  # "latest" points at a run listed under its own name
            continue
        m = json.loads(metrics.read_text())
        reports = sorted(p.name for p in metrics.parent.iterdir() if p.name.startswith("report"))
        print(f"| {metrics.parent.parent.name} | {m.get('model')} | {m.get('device')} | {m.get('epochs_run')} | "
              f"{fmt(m.get('seconds_per_epoch'))} | {fmt(m.get('test', {}).get('accuracy'), '.4f')} | "
              f"{', '.join(reports) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
