"""Portability on real data: train under each backend, predict under every backend, compare.

For each backend, ``python -m fmnist_keras.train`` trains the default CNN in
float32 (``--no-mixed-precision``; ``tests/test_portability.py`` checks
mixed-precision files) in a fresh process; then one fresh process per backend loads all three
``model.keras`` files and predicts the 10,000 test images. For a model
trained under backend A, the reference is A's own predictions from the saved
file; the table shows the max absolute difference of the softmax outputs
when B loads the same file (the project's limit is 1e-4), and how many of
the 10,000 predicted classes change.

Usage:
    python benchmarks/portability.py --subset 2000            # quick: about 10 minutes on 2 CPU cores
    python benchmarks/portability.py --epochs 1 --json portability.json   # all 60k training images

Run files go to ``--out-dir`` (default: a new temporary directory), never to ``runs/``.
Every file the script writes there is written to a temporary sibling and
renamed into place, so a link planted under its name is replaced, never
written through.
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fmnist_keras import data as fdata
import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.backend import DEVICES
from fmnist_keras.cli import add_data_arguments, in_range, one_line, print_error
from fmnist_keras.config import BACKENDS, RANGES
from children import last_line, start_child, stopping
from fmnist_keras import interrupts
from fmnist_keras.rundir import RunDir, RunDirError, read_run_text, replacing, write_bytes, write_text

TOLERANCE = 1e-4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp", "baseline-cnn"),
                        help="model to train under each backend (default: cnn)")
    parser.add_argument("--epochs", type=in_range(*RANGES["epochs"]), default=1,
                        help="training epochs per backend (default: 1)")
    parser.add_argument("--subset", type=in_range(*RANGES["subset"]),
                        help="train on N stratified training images (default: all 60000)")
    parser.add_argument("--seed", type=in_range(*RANGES["seed"]), default=42,
                        help="training seed, the same for every backend (default: 42)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help=f"backends to compare (default: {' '.join(BACKENDS)})")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="device of training and prediction (default: cpu)")
    add_data_arguments(parser)  # --data-dir and --no-verify, passed on to train
    parser.add_argument("--out-dir", type=out_dir_path,
                        help="where the runs go: a new or empty directory, or one this script wrote before "
                        "(default: a new temporary directory)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the results to this JSON file (a new file, or an earlier result, which is "
                        "replaced)")
    args = parser.parse_args(argv)
    args.backends = list(dict.fromkeys(args.backends))  # each backend once, in the order given
    if len(args.backends) < 2:
        parser.error(f"--backends {' '.join(args.backends)} names one backend, and a file is compared only when "
                     f"another backend loads it; pass two or more, such as --backends torch jax")
    if args.out_dir is not None:
        listed = names_listed(args.out_dir)
        theirs = next((name for name in names_written(args.backends)
                       if os.path.lexists(args.out_dir / name) and name not in listed), None)
        if theirs is not None:
            parser.error(one_line(f"--out-dir {args.out_dir} holds {theirs}, which its {MARKER} does not list as the "
                                  f"script's (a marker made by hand, or by another version of the script), so it is "
                                  f"left alone; move it away or pass a new or empty directory"))
    return args


# The file that marks a directory as this script's, so that a later run may write into it again: a JSON object
# that lists the names the script writes there (names_written), each replaced by a later run only if listed.
MARKER = ".fmnist_keras-portability"
WRITTEN_BY = "benchmarks/portability.py"


def names_written(backends: list[str]) -> list[str]:
    """What the script writes in ``--out-dir`` for ``backends``: the test images, each backend's predictions and
    each backend's run (``train --overwrite`` replaces it)."""
    return ["test_images.npy", *(f"predictions-{b}.npz" for b in backends), *(f"trained-{b}" for b in backends)]


def names_listed(out_dir: Path) -> set[str]:
    """The names the marker in ``out_dir`` lists as the script's: none where there is no marker the script wrote
    (none, a user's, a damaged one)."""
    try:
        marker = json.loads(read_run_text(out_dir / MARKER, "the script's marker", "pass another --out-dir"))
    except (OSError, ValueError, RunDirError):
        return set()
    names = marker.get("names") if isinstance(marker, dict) and marker.get("written_by") == WRITTEN_BY else None
    return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()


def out_dir_path(text: str) -> Path:
    """An argparse type for ``--out-dir``: a new or empty directory, or one that holds :data:`MARKER`.

    The script writes test_images.npy and predictions-*.npz there, so a
    directory of anything else, a link or a file is refused.
    """
    path = Path(text)
    problem = None
    try:
        if not text.strip():
            problem = "is empty; pass a new directory such as runs/portability"
        elif path.is_symlink():
            problem = f"{path} is a symbolic link; pass a real directory"
        elif path.exists() and not path.is_dir():
            problem = f"{path} exists and is not a directory; pass a new directory"
        elif path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
            problem = (f"{path} holds files this script did not write (no {MARKER}), which it could replace; "
                       f"pass a new or empty directory")
        else:  # to be made: below a directory (train's own check of --out-dir)
            RunDir.check_out_dir(path)
    except RunDirError as error:
        problem = str(error).removeprefix("--out-dir ")  # argparse names the argument
    except OSError as error:  # a name too long, a directory that cannot be read
        problem = f"{path} cannot be used ({error.strerror or error}); pass another directory"
    if problem:
        raise argparse.ArgumentTypeError(one_line(problem))
    return path


def _run(command: list[str], env: dict) -> float:
    """Run a command, stream nothing; return its wall time, or exit with one line: the step, the backend and the
    last line the command wrote on stderr. On Ctrl-C or SIGTERM the command is ended as ``seeds.py`` ends its
    trains (:func:`children.stopping`: a ``train`` keeps its completed epochs), then the interrupt goes on."""
    start = time.perf_counter()
    # stderr goes to a file, not a pipe: a child that writes while it is being stopped never blocks on a full pipe.
    with tempfile.TemporaryFile() as errors, stopping({}) as running:
        with interrupts.deferred():  # a command started is a command known to stopping()
            running[0] = start_child(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        returncode = running[0].wait()
        why = last_line(errors)
    if returncode != 0:
        step = "training" if "fmnist_keras.train" in command else "predicting"
        backend = command[command.index("--backend") + 1] if "--backend" in command else "?"
        code = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
        why = why.rstrip(".") or "it wrote nothing on stderr"  # the last line says why, not usage
        print_error(f"{step} under {backend} failed ({code}): {why}; fix that and run portability.py again, or leave "
                    f"{backend} out of --backends")
        sys.exit(1)
    return time.perf_counter() - start


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary sibling of ``path``, renamed over it: a link there is replaced, not followed."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def _predict(backend: str, device: str, inputs: Path, models: list[Path], npz: Path, env: dict) -> tuple[float, dict]:
    """Predict ``inputs`` with every model under ``backend`` in a fresh process, which writes a new temporary
    sibling of ``npz``; rename that over ``npz`` (a link there is replaced, never written through).

    Returns the wall time and the outputs (keys ``"0"``, ``"1"``, ... in the order of ``models``).
    """
    with replacing(npz, suffix=".npz") as (handle, temporary):  # numpy adds .npz to a name without it
        os.close(handle)  # the worker writes the file by name: a new one, so never through a planted link
        seconds = _run([sys.executable, "-m", "fmnist_keras._portability", "predict", "--backend", backend, "--device",
                        device, "--inputs", str(inputs), "--output", str(temporary), *(str(m) for m in models)], env)
        with np.load(temporary, allow_pickle=False) as loaded:
            outputs_of = {key: loaded[key] for key in loaded.files}
    return seconds, outputs_of


def main(argv=None) -> int:
    args = parse_args(argv)
    (_, _), (x_test, y_test) = fdata.load_data(args.data_dir, verify=args.verify)  # bad data: no directory made
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="fmnist-portability-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # A new file renamed into place, as every file here (never through a link), before any of the names it lists.
    listed = sorted(names_listed(out_dir) | set(names_written(args.backends)))
    write_text(out_dir / MARKER, json.dumps({"written_by": WRITTEN_BY, "names": listed}, indent=1) + "\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)  # each command's --backend decides

    inputs = out_dir / "test_images.npy"
    _save_npy(inputs, fdata.to_model_input(x_test, "channels_last"))

    train_s, models = {}, {}
    for backend in args.backends:
        command = [sys.executable, "-m", "fmnist_keras.train", "--model", args.model, "--epochs", str(args.epochs),
                   "--seed", str(args.seed), "--backend", backend, "--device", args.device,
                   "--out-dir", str(out_dir), "--run-name", f"trained-{backend}", "--overwrite",
                   "--no-mixed-precision"]  # float32 under every backend: the 1e-4 tolerance is for float32
        command += ["--subset", str(args.subset)] if args.subset else []
        command += ["--data-dir", args.data_dir] if args.data_dir else []
        command += [] if args.verify else ["--no-verify"]
        print(f"training {args.model} under {backend} ...", flush=True)
        train_s[backend] = _run(command, env)
        models[backend] = out_dir / f"trained-{backend}" / args.model / "model.keras"

    probabilities_of, predict_s = {}, {}  # (saved under, loaded under) -> the test probabilities
    for backend in args.backends:
        print(f"predicting {len(x_test)} test images with every model under {backend} ...", flush=True)
        npz = out_dir / f"predictions-{backend}.npz"
        predict_s[backend], loaded = _predict(backend, args.device, inputs, [models[a] for a in args.backends], npz,
                                              env)
        for i, saved_under in enumerate(args.backends):
            probabilities_of[saved_under, backend] = loaded[str(i)]

    results = []
    for saved_under in args.backends:
        reference = probabilities_of[saved_under, saved_under]
        for loaded_under in args.backends:
            if loaded_under == saved_under:
                continue
            probabilities = probabilities_of[saved_under, loaded_under]
            results.append({
                "saved_under": saved_under,
                "loaded_under": loaded_under,
                "max_abs_diff": float(np.max(np.abs(probabilities - reference))),
                "changed_predictions": int(np.sum(probabilities.argmax(1) != reference.argmax(1))),
                "test_accuracy": float(np.mean(probabilities.argmax(1) == y_test)),
            })
    accuracy = {b: float(np.mean(probabilities_of[b, b].argmax(1) == y_test)) for b in args.backends}

    print(f"\n{args.model}, {args.epochs} epoch(s) on {args.subset or 60000} training images; "
          f"{len(x_test)} test images; max |softmax difference| when the file is loaded under another backend")
    print(f"{'saved under':<12} {'loaded under':<13} {'max abs diff':>12} {'changed':>8} {'test acc':>9}")
    for row in results:
        print(f"{row['saved_under']:<12} {row['loaded_under']:<13} {row['max_abs_diff']:>12.2e} "
              f"{row['changed_predictions']:>8} {row['test_accuracy']:>9.4f}")
    print("own-backend test accuracy: " + ", ".join(f"{b} {a:.4f}" for b, a in accuracy.items()))
    print("wall seconds: " + ", ".join(f"{b} train {train_s[b]:.0f} / predict {predict_s[b]:.0f}" for b in args.backends))
    worst = max(row["max_abs_diff"] for row in results)
    verdict = "PASS" if worst <= TOLERANCE else "FAIL"
    print(f"{verdict}: worst difference {worst:.2e} (tolerance {TOLERANCE:g}); runs in {out_dir}")

    report = {
        "model": args.model, "epochs": args.epochs, "subset": args.subset, "seed": args.seed, "device": args.device,
        "num_test": int(len(x_test)), "tolerance": TOLERANCE, "worst_max_abs_diff": worst, "passed": worst <= TOLERANCE,
        "own_backend_test_accuracy": accuracy, "directions": results,
        "train_wall_s": {b: round(s, 1) for b, s in train_s.items()},
        "predict_wall_s": {b: round(s, 1) for b, s in predict_s.items()}, "out_dir": str(out_dir),
    }
    if args.json:
        outputs.write_json(args.json, report)
    print(json.dumps(report))
    if worst > TOLERANCE:
        row = max(results, key=lambda r: r["max_abs_diff"])
        print_error(f"a model saved under {row['saved_under']} gives softmax outputs {worst:.2e} away from its own "
                    f"when loaded under {row['loaded_under']}, over the {TOLERANCE:g} tolerance; the table above has "
                    f"every direction, and tests/test_portability.py the checks to run")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "portability.py"))
