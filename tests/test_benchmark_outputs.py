"""Where the benchmark scripts write: --json and logs are checked first and never written through a link."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import outputs  # noqa: E402  (benchmarks/outputs.py)


@pytest.fixture
def place(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "earlier.json").write_text('{"written_by": "fmnist_keras benchmarks", "rows": []}')
    (tmp_path / "package.json").write_text('{"name": "a project of the user\'s", "rows": []}')  # JSON, not a result
    (tmp_path / "list.json").write_text('["written_by", "fmnist_keras benchmarks"]')
    (tmp_path / "link.json").symlink_to(tmp_path / "thesis.tex")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "a-dir").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, refusal", [
    ("", "is not a file name"),
    (".", "is not a file name"),
    ("thesis.tex", "is not a benchmark's earlier result"),
    ("package.json", "is not a benchmark's earlier result"),
    ("list.json", "is not a benchmark's earlier result"),
    ("link.json", "is a symbolic link"),
    ("dangling.json", "is a symbolic link"),
    ("a-dir", "is not a regular file"),
    ("thesis.tex/x.json", "is not a directory"),
    ("missing/x.json", "is not a directory"),
    ("two\nlines/x.json", "two\\\\nlines is not a directory"),  # one line, the newline escaped
])
def test_a_json_path_that_is_not_a_new_file_or_an_earlier_result_is_refused(place, monkeypatch, name, refusal):
    monkeypatch.chdir(place)
    with pytest.raises(argparse.ArgumentTypeError, match=refusal):
        outputs.json_path(name)
    assert (place / "thesis.tex").read_text() == "years of work"
    assert (place / "package.json").read_text().startswith('{"name"')


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which takes no new file")
def test_a_json_path_in_a_directory_that_takes_no_new_file_is_refused_before_any_work():
    with pytest.raises(argparse.ArgumentTypeError, match="/proc takes no new file named like results.json .*; pass "
                                                         "a shorter name, or a file in a directory"):
        outputs.json_path("/proc/results.json")


def test_a_json_name_too_long_for_the_temporary_file_beside_it_is_refused_before_any_work(tmp_path):
    # write_json writes .partial-NAME.XXXXXXXX first: a NAME that fits alone may not fit in that name.
    name = "a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5) + ".json"
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path} takes no new file named like {name} "
                                                         r"\(File name too long\); pass a shorter name"):
        outputs.json_path(str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []
    assert outputs.json_path(str(tmp_path / "results.json")) == tmp_path / "results.json"  # control
    assert list(tmp_path.iterdir()) == []  # the probe made there is gone


def test_a_new_file_or_an_earlier_result_is_written_whole(place):
    import os

    victim = place / "thesis.tex"
    for guess in (f".partial-{os.getpid()}-new.json", f".new.json.{os.getpid()}.partial"):  # names a writer might pick
        (place / guess).symlink_to(victim)
    for name in ("new.json", "earlier.json"):
        path = outputs.json_path(str(place / name))
        outputs.write_json(path, {"rows": [1, 2]})
        assert json.loads(path.read_text()) == {"written_by": "fmnist_keras benchmarks", "rows": [1, 2]}
        assert outputs.json_path(str(path)) == path  # what a benchmark wrote, the next run may replace
    assert victim.read_text() == "years of work" and not (place / "new.json").is_symlink()
    assert [p.name for p in place.iterdir() if ".partial" in p.name and not p.is_symlink()] == []


def test_a_log_is_never_opened_through_a_link(place):
    with pytest.raises(OSError, match="symbolic link"):
        outputs.open_log(place / "link.json", ["train"])
    assert (place / "thesis.tex").read_text() == "years of work"
    with outputs.open_log(place / "run.log", ["train", "--seed", "1"]) as log:
        log.write("line\n")
    assert (place / "run.log").read_text() == "# fmnist_keras benchmarks log: train --seed 1\nline\n"


def test_a_log_replaces_only_an_earlier_log_never_a_users_file(place):
    with pytest.raises(OSError, match="not a log a benchmark wrote"):
        outputs.open_log(place / "thesis.tex", ["train"])
    assert (place / "thesis.tex").read_text() == "years of work"
    with outputs.open_log(place / "run.log", ["train"]) as log:
        log.write("first\n")
    outputs.check_log(place / "run.log")  # what a benchmark wrote, the next run may replace
    with outputs.open_log(place / "run.log", ["train", "again"]) as log:
        log.write("second\n")
    assert (place / "run.log").read_text() == "# fmnist_keras benchmarks log: train again\nsecond\n"
    assert [p.name for p in place.iterdir() if ".partial" in p.name] == []
    from fmnist_keras.rundir import write_text

    write_text(place / "ordinary.txt", "")  # the project's ordinary file: the umask's permissions, not private
    assert (place / "run.log").stat().st_mode & 0o777 == (place / "ordinary.txt").stat().st_mode & 0o777


def test_a_log_that_cannot_be_read_is_left_alone_and_named_as_such(place, monkeypatch):
    os.mkfifo(place / "unread.log")
    with pytest.raises(OSError, match="is a symbolic link or not a regular file"):
        outputs.check_log(place / "unread.log")  # a FIFO: never opened, never waited on
    (place / "locked.log").write_text("# fmnist_keras benchmarks log: train\n")
    real_open = os.open

    def denied(path, *args, **kwargs):  # as for a file without read permission (root reads those anyway)
        if Path(path).name == "locked.log":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "open", denied)
    with pytest.raises(OSError, match="exists and cannot be read .Permission denied., so it is not known"):
        outputs.check_log(place / "locked.log")
    assert (place / "locked.log").read_text() == "# fmnist_keras benchmarks log: train\n"


# --- the benchmarks' own arguments: refused before anything is replaced ---------------------


@pytest.mark.parametrize("flags, says", [
    (["--ema", "1.5"], "argument --ema"),
    (["--epochs", "0"], "argument --epochs"),
    (["--seeds", "-1"], "argument --seeds"),
    (["--split-seed", "-1"], "argument --split-seed"),
    (["--learning-rate", "1e9"], "argument --learning-rate"),
    (["--label-smoothing", "nan"], "argument --label-smoothing"),
    (["--subset", "0"], "argument --subset"),
    (["--filters", "0", "8"], "argument --filters"),
    (["--filters", "8", "8", "8", "8", "8"], "at most 4 blocks"),
    (["--convs", "2", "2", "2"], "one per block (2)"),
    (["--model", "cnn-large", "--convs", "17"], "argument --convs"),
    (["--dense-units", "100000"], "argument --dense-units"),
    (["--seeds", "3", "3"], "--seeds 3 3 names a seed twice; give each once"),
])
def test_ablation_refuses_a_bad_number_before_it_replaces_an_earlier_run(tmp_path, capsys, flags, says):
    import ablation

    with pytest.raises(SystemExit) as stop:
        ablation.parse_args(["--out-dir", str(tmp_path), *flags])
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert says in line
    args = ablation.parse_args(["--out-dir", str(tmp_path), "--seeds", "42", "1", "--ema", "0"])  # the control
    assert [ablation.train_config(args, seed).check().splitting_seed for seed in args.seeds] == [42, 1]
    one_split = ablation.parse_args(["--out-dir", str(tmp_path), "--seeds", "42", "1", "--split-seed", "0"])
    configs = [ablation.train_config(one_split, seed) for seed in one_split.seeds]
    assert [(config.seed, config.splitting_seed) for config in configs] == [(42, 0), (1, 0)]
    widest = ablation.parse_args(["--out-dir", str(tmp_path), "--filters", "2048", "1", "1", "1", "--convs", "16",
                                  "--dense-units", "16384"])  # the bounds themselves are allowed
    assert (widest.filters, widest.convs, widest.dense_units) == ([2048, 1, 1, 1], [16], 16384)


def test_ablation_checks_every_seeds_run_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    import ablation

    from fmnist_keras import data as fdata
    from fmnist_keras.rundir import MARKER

    theirs = tmp_path / "runs" / "cnn-seed1"  # the second seed's run, with a file of the user's in it
    theirs.mkdir(parents=True)
    (theirs / MARKER).write_text("{}")
    (theirs / "notes.txt").write_text("mine")
    monkeypatch.setattr(fdata, "load_data", lambda *args, **kwargs: pytest.fail("the data was read"))
    assert ablation.main(["--out-dir", str(tmp_path / "runs"), "--seeds", "42", "1", "--ema", "0"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {theirs} holds {theirs / 'notes.txt'}, which is not what train writes in a run")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cnn-seed1"]
    assert (theirs / "notes.txt").read_text() == "mine"


def test_ablation_replaces_only_its_own_runs_not_a_trains_of_the_same_name(tmp_path, capsys, monkeypatch):
    # seeds.py and train name their runs OUT_DIR/cnn-seedS too: hours of training.
    import ablation

    from fmnist_keras import data as fdata
    from fmnist_keras.rundir import MARKER

    runs = tmp_path / "runs"
    for seed, made_by in ((42, {"made_by": "benchmarks/ablation.py"}), (1, {})):
        (runs / f"cnn-seed{seed}" / "cnn").mkdir(parents=True)
        (runs / f"cnn-seed{seed}" / MARKER).write_text("{}")
        (runs / f"cnn-seed{seed}" / "run.json").write_text(json.dumps({"models": ["cnn"], **made_by}))
    monkeypatch.setattr(fdata, "load_data", lambda *args, **kwargs: pytest.fail("the data was read"))
    assert ablation.main(["--out-dir", str(runs), "--seeds", "42", "1", "--ema", "0"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {runs / 'cnn-seed1'} is a run that benchmarks/ablation.py did not make (train's, or "
                    f"another script's), so it is left alone; choose another --out-dir.")
    args = ablation.parse_args(["--out-dir", str(runs), "--seeds", "42"])
    ablation.check_replaceable(args, 42)  # the control: its own run may go
    assert sorted(p.name for p in (runs / "cnn-seed1").iterdir()) == [MARKER, "cnn", "run.json"]


def test_an_ablation_run_is_marked_so_that_train_resume_refuses_to_go_on_with_trains_recipe(
        tmp_path, tiny_data_dir, capsys):
    import ablation

    from fmnist_keras import data as fdata
    from fmnist_keras import train

    args = ablation.parse_args(["--out-dir", str(tmp_path / "runs"), "--seeds", "3", "--epochs", "1", "--ema", "0"])
    row = ablation.run_seed(args, 3, fdata.load_data(str(tiny_data_dir), verify=False))
    run = tmp_path / "runs" / "cnn-seed3"
    assert row["epochs_run"] == 1 and (run / "cnn" / "model.keras").is_file()
    assert json.loads((run / "run.json").read_text()) == {"models": ["cnn"], "made_by": "benchmarks/ablation.py"}
    capsys.readouterr()
    assert train.main(["--resume", str(run)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "benchmarks/ablation.py made this run" in error
    assert error.endswith("run benchmarks/ablation.py again, which replaces its runs.")  # it has no --overwrite


@pytest.mark.parametrize("script, flags, says", [
    ("bench", ["--epochs", "0"], "argument --epochs"),
    ("bench", ["--subset", "-5"], "argument --subset"),
    ("bench", ["--threads", "0"], "argument --threads"),
    ("overhead", ["--batch-size", "0"], "argument --batch-size"),
    ("overhead", ["--rounds", "0"], "argument --rounds"),
    ("overhead", ["--subset", "70000"], "argument --subset"),
    ("profile_overhead", ["--threads", "-1"], "argument --threads"),
    ("profile_overhead", ["--top", "0"], "argument --top"),
    ("syncs", ["--batch-size", "-128"], "argument --batch-size"),
])
def test_the_timing_benchmarks_refuse_a_bad_number_when_parsing(script, flags, says, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(flags)
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert says in line and "must be" in line
    flag, good = flags[0], {"--epochs": "2", "--rounds": "2", "--subset": "600"}.get(flags[0], "4")
    assert getattr(module.parse_args([flag, good]), flag[2:].replace("-", "_")) == int(good)  # the control


def test_seeds_reports_no_result_for_a_seed_whose_train_failed(tmp_path, monkeypatch, capsys):
    import seeds

    earlier = tmp_path / "cnn-seed1" / "cnn" / "metrics.json"  # an earlier run's result
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"test": {"accuracy": 0.9999, "macro_f1": 0.9999}, "best_epoch": 1,
                                   "epochs_run": 1, "seconds_per_epoch": 1.0}))
    (tmp_path / "cnn-seed1.log").write_text(f"{outputs.LOG_STAMP}: the earlier run's command\n")  # seeds.py's run

    class Failed:
        returncode = 2

        def poll(self):
            return self.returncode

    monkeypatch.setattr(seeds, "launch", lambda args, seed: Failed())
    monkeypatch.setattr(seeds.time, "sleep", lambda seconds: None)
    result = tmp_path / "result.json"
    assert seeds.main(["--seeds", "1", "--out-dir", str(tmp_path), "--json", str(result)]) == 1
    assert not result.exists()  # no seed finished: no result to write
    assert "0.9999" not in capsys.readouterr().out


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_seeds_refuses_a_number_of_jobs_that_would_never_start_a_run(jobs, capsys):
    import seeds

    with pytest.raises(SystemExit) as stop:
        seeds.parse_args(["--jobs", jobs])
    assert stop.value.code == 2 and "argument --jobs" in capsys.readouterr().err


# --- every benchmark script: its data flags, and one line for bad data or a damaged file ------


@pytest.mark.parametrize("script", ["ablation", "bench", "overhead", "profile_overhead", "syncs"])
def test_each_script_that_reads_the_data_takes_the_data_flags_and_passes_them_to_the_loader(script, tmp_path,
                                                                                         monkeypatch):
    module = __import__(script)
    parse_args = module.parse_args
    out = ["--out-dir", str(tmp_path / "runs")] if script == "ablation" else []
    args = parse_args([*out, "--data-dir", str(tmp_path / "idx"), "--no-verify"])
    assert (args.data_dir, args.verify) == (str(tmp_path / "idx"), False)
    if script == "ablation":  # the run records the data it was trained on, as train's config.json does
        config = module.train_config(parse_args([*out, "--data-dir", "idx", "--no-verify"]), 1)
        assert (config.data_dir, config.verify) == (str(Path("idx").absolute()), False)
    if script == "syncs" or os.environ["KERAS_BACKEND"] != "torch":  # syncs counts on a CUDA device alone;
        return  # overhead and others compare against plain PyTorch, on the torch backend only
    from fmnist_keras import data as fdata

    def load_data(data_dir=None, verify=True, **kwargs):  # the loader is asked for that data, then stops the script
        raise fdata.DataError(f"asked for {data_dir} with verify={verify}")

    monkeypatch.setattr(fdata, "load_data", load_data)
    monkeypatch.setattr(module, "parse_args", lambda argv=None: args)
    import fmnist_keras.backend

    monkeypatch.setattr(fmnist_keras.backend, "select_backend", lambda *a, **k: None)
    with pytest.raises(fdata.DataError, match=f"asked for {tmp_path / 'idx'} with verify=False"):
        module.main([])


def test_a_benchmark_gives_bad_data_or_a_damaged_run_one_line_and_exit_1(capsys):
    from fmnist_keras.data import DataError
    from fmnist_keras.loading import ModelLoadError
    from fmnist_keras.rundir import RunDirError

    for error in (DataError("idx/train-images-idx3-ubyte.gz is damaged; fix it"), RunDirError("run/config.json is "
                  "damaged; restore it"), ModelLoadError("model.keras is not a zip archive; retrain it")):
        def main(error=error):
            raise error

        assert outputs.run_benchmark(main, "bench.py") == 1
        assert capsys.readouterr().err == f"error: {error}\n"
    assert outputs.run_benchmark(lambda: 0, "bench.py") == 0


def test_gpu_summary_explains_itself_and_names_a_damaged_file(tmp_path, capsys):
    import gpu_summary

    with pytest.raises(SystemExit) as stop:
        gpu_summary.main(["--help"])
    assert stop.value.code == 0 and "output directory of benchmarks/gpu_check.sh" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        gpu_summary.main([str(tmp_path / "missing")])
    assert stop.value.code == 2 and "is not a directory" in capsys.readouterr().err
    (tmp_path / "bench.json").write_text('{"rows": [')  # cut short by its step's time limit
    with pytest.raises(SystemExit) as stop:
        gpu_summary.main([str(tmp_path)])
    assert str(stop.value.code).startswith(f"error: {tmp_path / 'bench.json'} cannot be read as JSON")


@pytest.mark.parametrize("name, text, said", [
    ("bench.json", '{"backend": "torch", "rows": []}', "lacks the key 'num_train'"),
    ("overhead.json", '{"batch_size": 128, "device": "cpu", "keras": "3", "rows": [{"model": "cnn"}]}',
     "lacks the key 'fast_ms'"),
    ("syncs.json", '{"device": "GPU", "keras": "3", "rows": [{"model": "cnn", "path": "fast", "per_step": 0, '
     '"where": []}]}', "holds a value of another form"),
    ("runs/r/cnn/metrics.json", '{"validation": 0.9}', "holds a value of another form"),
    ("steps.tsv", "\nbench\t1.0\t2.0\n", "line 2, is not 'name, start, end, limit, exit status'"),  # blank: skipped
    ("overhead.json", '{"batch_size": 128, "device": "cpu", "keras": "3", "rows": [{"model": "cnn", "fast_ms": 1'
     + "0" * 400 + ', "torch_ms": 1, "fast_over_torch": 1}]}', "holds a value of another form"),
    ("bench.json", "[" * 100_000 + "]" * 100_000, "cannot be read as JSON"),
    ("runs/r/cnn/metrics.json", '{"epochs_run": -3}', "(epochs_run -3 is not an epoch count)"),
    ("runs/r/cnn/metrics.json", '{"epochs_run": 4, "best_epoch": 2.5}', "(best_epoch 2.5 is not an epoch count)"),
    ("runs/r/cnn/config.json", '{"model": "cnn", "batch_size": 0}',
     "is damaged: batch_size is 0; expected a whole number from 1 to 60000"),
])
def test_gpu_summary_names_a_file_of_another_version_or_form_in_one_line(tmp_path, name, text, said):
    import gpu_summary

    (tmp_path / "runs" / "r" / "cnn").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "cnn" / "config.json").write_text('{"model": "cnn"}')
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as stop:
        gpu_summary.main([str(tmp_path)])
    line = str(stop.value.code)
    assert line.startswith(f"error: {tmp_path / name}") and said in line and "\n" not in line, line


def test_syncs_without_a_cuda_device_writes_why_nothing_was_counted_and_the_summary_says_so(tmp_path, capsys):
    import gpu_summary
    import syncs

    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("syncs.py counts on the torch backend alone (its refusal of another: the test below)")
    import torch

    if torch.cuda.is_available():
        pytest.skip("counts for real on a CUDA device")
    assert syncs.main(["--json", str(tmp_path / "syncs.json")]) == 0
    result = json.loads((tmp_path / "syncs.json").read_text())
    assert result["rows"] == [] and "no CUDA device" in result["not_counted"]
    capsys.readouterr()
    assert gpu_summary.main([str(tmp_path)]) == 0
    assert "Not counted: no CUDA device here, so no synchronisation to count" in capsys.readouterr().out


@pytest.mark.parametrize("backend, message", [
    ("jax", "error: syncs.py counts torch's synchronisations with a CUDA GPU on the torch backend, but $KERAS_BACKEND "
            "is 'jax'; unset it or set KERAS_BACKEND=torch."),
    ("bogus", "error: syncs.py counts torch's synchronisations with a CUDA GPU on the torch backend, but "
              "$KERAS_BACKEND is 'bogus'; unset it or set KERAS_BACKEND=torch."),
])
def test_syncs_under_another_backend_is_one_line_before_keras_loads(tmp_path, backend, message):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "syncs.py"), "--json", str(tmp_path / "syncs.json")],
                            capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": backend}, timeout=120)
    assert (result.returncode, result.stderr) == (1, message + "\n")
    assert not (tmp_path / "syncs.json").exists()


def test_gpu_summary_escapes_what_the_terminals_encoding_lacks_instead_of_blaming_the_file(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({
        "backend": "torch", "num_train": 10, "batch_size": 2, "rounds": 1, "device": "GPU \u2122", "keras": "3",
        "rows": [{"model": "cnn", "path": "fast", "s_per_epoch": 1.0, "train_img_s": 10.0, "peak_mb": None,
                  "test_acc": 0.5}]}))
    result = subprocess.run([sys.executable, str(Path(outputs.__file__).parent / "gpu_summary.py"), str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "GPU \\u2122" in result.stdout and "| cnn | fast | 1.00 |" in result.stdout


def test_ablations_sgd_keeps_the_moving_average_that_train_compares(monkeypatch):
    # fit swaps the average in for validation whenever config.ema > 0 (SwapEMAWeights), which needs use_ema.
    import ablation
    import keras

    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine import recipe

    monkeypatch.setattr(recipe, "make_optimizer", recipe.make_optimizer)  # use_sgd replaces it: put back after
    ablation.use_sgd()
    averaged = recipe.make_optimizer(TrainConfig(model="cnn", ema=0.9, epochs=2), steps_per_epoch=50)
    assert isinstance(averaged, keras.optimizers.SGD) and averaged.use_ema
    assert averaged.ema_momentum == pytest.approx(recipe.averaging_momentum(0.9, 100))
    assert not recipe.make_optimizer(TrainConfig(model="cnn", ema=0.0), steps_per_epoch=50).use_ema


@pytest.mark.parametrize("appeared", ["a file of the user's", "a link", None])
def test_a_result_file_that_appeared_during_the_run_is_left_alone(tmp_path, appeared):
    # --json is checked when the arguments are parsed; an ablation then runs for hours.
    path = outputs.json_path(str(tmp_path / "results.json"))
    if appeared == "a link":
        (tmp_path / "notes.txt").write_text("mine")
        path.symlink_to(tmp_path / "notes.txt")
    elif appeared:
        path.write_text(appeared)
    if appeared is None:  # the control: a new file, then an earlier result, is written
        outputs.write_json(path, {"rows": [1]})
        outputs.write_json(path, {"rows": [2]})
        assert json.loads(path.read_text())["rows"] == [2]
        return
    with pytest.raises(outputs.ResultTaken, match=f"^{path} appeared while the benchmark ran and is not a "
                                                  f"benchmark's earlier result, so it is left alone"):
        outputs.write_json(path, {"rows": [1]})
    assert (tmp_path / "notes.txt" if appeared == "a link" else path).read_text() in ("mine", appeared)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial-")] == []


@pytest.mark.parametrize("error", ["split", "backend", "result"])
def test_a_benchmark_that_cannot_split_the_data_or_use_the_backend_ends_with_one_line(capsys, error):
    from fmnist_keras.backend import BackendError
    from fmnist_keras.data import SplitError

    raised = {"split": SplitError("a subset of 5 images cannot hold every class; use at least 200."),
              "backend": BackendError("unknown backend 'nonsense' (from $KERAS_BACKEND); choose one of torch"),
              "result": outputs.ResultTaken("r.json appeared while the benchmark ran")}[error]

    def main():
        raise raised

    assert outputs.run_benchmark(main, "bench.py") == 1
    assert capsys.readouterr().err == f"error: {raised}\n"


def test_the_torch_only_benchmarks_name_another_keras_backend_in_one_line(monkeypatch):
    from fmnist_keras.backend import BackendError

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(BackendError, match="^overhead.py compares Keras with a PyTorch twin on the torch backend, but "
                                           "\\$KERAS_BACKEND is 'jax'; unset it or set KERAS_BACKEND=torch.$"):
        outputs.select_torch("overhead.py")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    outputs.select_torch("overhead.py")  # the control


def test_bench_takes_no_abbreviation_for_overhead(capsys):
    import bench

    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--overh"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --overh" in capsys.readouterr().err


def test_tta_views_refuses_one_run_given_twice(tmp_path, capsys):
    import tta_views

    (tmp_path / "run" / "cnn").mkdir(parents=True)
    (tmp_path / "run" / "cnn" / "model.keras").write_bytes(b"not read")
    with pytest.raises(SystemExit) as stop:
        tta_views.main([str(tmp_path / "run"), str(tmp_path / "run" / ".")])
    assert stop.value.code == 2
    assert "two of the runs given are one run (the same cnn/model.keras); give each run once" in capsys.readouterr().err


@pytest.mark.parametrize("runs", [[""], [" ", "RUN"]])
def test_tta_views_names_an_empty_run_name_instead_of_looking_in_the_current_directory(tmp_path, capsys, monkeypatch,
                                                                                       runs):
    import tta_views

    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "model.keras").write_bytes(b"not read")  # what "" would find, read as "."
    (tmp_path / "run" / "cnn").mkdir(parents=True)
    (tmp_path / "run" / "cnn" / "model.keras").write_bytes(b"not read")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        tta_views.main([str(tmp_path / "run") if run == "RUN" else run for run in runs])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        ": error: argument runs: expected a path, got an empty string (an unset variable?)")


def test_the_tables_say_when_the_one_round_timed_is_the_warm_up():
    assert outputs.rounds_note(3) == "median after 1 warm-up"
    assert "the warm-up round itself" in outputs.rounds_note(1)


def test_a_signal_kept_during_a_seed_stops_ablation_before_the_next_seed(tmp_path, tiny_data_dir, capsys, monkeypatch):
    import signal

    import ablation

    from fmnist_keras import interrupts

    trained = []

    def seed_that_keeps_a_sigterm(args, seed, raw):  # as a SIGTERM lost in a garbage-collection callback would be
        trained.append(seed)
        monkeypatch.setattr(interrupts, "raise_if_lost", lambda: (_ for _ in ()).throw(
            interrupts.Interrupted(signal.SIGTERM)))
        return {}

    monkeypatch.setattr(ablation, "run_seed", seed_that_keeps_a_sigterm)
    argv = ["--out-dir", str(tmp_path / "runs"), "--seeds", "42", "1", "--ema", "0", "--data-dir", str(tiny_data_dir),
            "--no-verify"]
    assert outputs.run_benchmark(lambda: ablation.main(argv), "ablation.py") == 128 + signal.SIGTERM
    assert trained == [42]
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("ablation.py: interrupted (SIGTERM) before it "
                                                               "finished; run it again.")


def test_inference_takes_a_model_as_the_other_commands_do(tmp_path, capsys):
    # A run directory is what the loader's own hint offers; a directory without a model is its one line.
    import inference

    assert outputs.run_benchmark(lambda: inference.main(["--model", str(tmp_path)]), "inference.py") == 1
    assert capsys.readouterr().err == (f"error: {tmp_path} is a directory without model.keras, and none of its "
                                       f"sub-directories holds one; expected a run directory (runs/<run-name>/ or "
                                       f"runs/<run-name>/<model>/) or a .keras file; pass a model.keras written by "
                                       f"`python -m fmnist_keras.train`, or the run directory holding it.\n")


@pytest.mark.parametrize("name, make, said", [
    ("steps.tsv", lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ("overhead.json", lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ("gpu-memory.log", lambda p: os.mkfifo(p), "is not a regular file"),  # reading it would wait for a writer
    ("env.log", lambda p: p.write_bytes(b" " * (16 * 1024**2 + 1)), "is larger than 16 MiB"),
    ("steps.tsv", lambda p: p.write_text("bench\t1.0\tnan\t10\t0\n"), "line 1, is not 'name, start, end, limit"),
    ("overhead.json", lambda p: p.write_text('{"batch_size": NaN}'), "cannot be read as JSON (NaN is not a JSON"),
    ("overhead.json", lambda p: p.write_text('{"batch_size": 1e999}'), "cannot be read as JSON (1e999 is not a fin"),
])
def test_gpu_summary_refuses_a_special_huge_or_non_finite_file_in_one_line(tmp_path, name, make, said):
    import gpu_summary

    make(tmp_path / name)
    with pytest.raises(SystemExit) as stop:
        gpu_summary.main([str(tmp_path)])
    line = str(stop.value.code)
    assert line.startswith("error: ") and str(tmp_path / name) in line and said in line and "\n" not in line, line


def test_gpu_summary_shows_no_seconds_for_a_step_the_clock_was_set_back_during(tmp_path, capsys):
    import gpu_summary

    (tmp_path / "steps.tsv").write_text("bench\t5.0\t2.0\t10\t0\ntrain-default\t6.0\t9.5\t600\t0\n")
    assert gpu_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| bench | 0 | - | 10 |" in out and "| train-default | 0 | 4 | 600 |" in out


@pytest.mark.parametrize("given, said", [
    ("", "argument out: expected a path, got an empty string (an unset variable?)"),
    ("EMPTY", "holds none of the files gpu_check.sh writes"),
])
def test_gpu_summary_refuses_an_empty_name_or_a_directory_without_the_checks_files(tmp_path, capsys, monkeypatch,
                                                                                   given, said):
    import gpu_summary

    (tmp_path / "steps.tsv").write_text("bench\t1.0\t2.0\t10\t0\n")  # what "" would read, as "."
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        gpu_summary.main([given])
    assert stop.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("batches, per_step", [(2, None), (3, 2.0), (40, 2.0)])
def test_syncs_counts_per_step_of_the_steps_it_saw_and_refuses_an_epoch_too_short_to_count(monkeypatch, batches,
                                                                                           per_step):
    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("syncs.py counts on the torch backend alone")
    import warnings

    import syncs
    import torch

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)  # no CUDA here: the window alone

    class Runner:  # each counted step makes two synchronisations at one line
        def fit(self, callbacks):
            for batch in range(batches):
                callbacks[0].on_train_batch_begin(batch)
                if syncs.FIRST <= batch < syncs.LAST:
                    for _ in range(2):
                        warnings.warn_explicit("called a synchronizing CUDA operation", UserWarning, "here.py", 7)

    if per_step is None:
        with pytest.raises(SystemExit, match="an epoch has fewer than 3 batches, and steps 3-6 are the ones counted"):
            syncs.count(Runner())
    else:
        assert syncs.count(Runner()) == {"here.py:7": per_step}


@pytest.mark.parametrize("module", ["twins.py", "runner.py"])
def test_the_benchmarks_modules_run_as_scripts_say_what_to_run_instead(module):
    result = subprocess.run([sys.executable, str(BENCHMARKS / module), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"error: benchmarks/{module} is a module the benchmarks import, not a "
                                              f"script; run bench.py or overhead.py (their --help says how)")


def _script_importing_early_signals(directory, then):
    """A script beside a copy of early_signals.py that imports it first, says 'ready', runs ``then`` and waits:
    the window of a benchmark script's imports, held open."""
    (directory / "early_signals.py").write_text((BENCHMARKS / "early_signals.py").read_text())
    script = directory / "slow_imports.py"
    script.write_text(f"import early_signals\nimport sys, time\n{then}\nprint('ready', flush=True)\ntime.sleep(60)\n")
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_benchmarks_imports_load_is_one_line(tmp_path, signum):
    child = _script_importing_early_signals(tmp_path, "")
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signum)
    _, err = child.communicate(timeout=30)
    assert err == f"slow_imports.py: interrupted ({signum.name}) while it started; nothing was written.\n"
    assert child.returncode == 128 + signum


def test_an_ignored_signal_stays_ignored_until_and_after_hand_over(tmp_path):
    # A benchmark started in the background of a script (`cmd &`) inherits an ignored SIGINT.
    (tmp_path / "early_signals.py").write_text((BENCHMARKS / "early_signals.py").read_text())
    script = tmp_path / "ignored.py"
    script.write_text("import early_signals, signal\nbefore = signal.getsignal(signal.SIGINT)\n"
                      "early_signals.hand_over()\nprint(before is signal.SIG_IGN, signal.getsignal(signal.SIGINT) is "
                      "signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n")
    done = subprocess.run([sys.executable, "-c", "import signal, subprocess, sys; signal.signal(signal.SIGINT, "
                           f"signal.SIG_IGN); sys.exit(subprocess.call([sys.executable, {str(script)!r}]))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "True True True\n" and done.returncode == 0, done.stderr


def test_after_hand_over_a_ctrl_c_is_pythons_again(tmp_path):
    child = _script_importing_early_signals(tmp_path, "early_signals.hand_over()")
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and "while it started" not in err  # run_command's handlers take it from here


def test_every_benchmark_script_imports_early_signals_first_and_a_test_import_changes_nothing():
    import ast

    import importlib

    import early_signals

    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    importlib.reload(early_signals)  # its import again, by a test: not a script run as a program
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers
    scripts = [path for path in BENCHMARKS.glob("*.py") if "run_benchmark(main, " in path.read_text()
               and path.name != "outputs.py"]
    assert len(scripts) >= 12
    for path in scripts:
        imports = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
                   and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
        assert ast.unparse(imports[0]) == "import early_signals", path.name
