"""The evaluate command and the report it writes, on tiny models and tiny synthetic IDX files."""

import json
import os
import re
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from fmnist_keras import evaluate, rundir
from fmnist_keras.config import TrainConfig
from fmnist_keras.data import CLASS_NAMES, load_data, to_model_input
from fmnist_keras.models import build_cnn, build_mlp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run_dir(directory, model, best_epoch=2):
    """A run directory as train writes it (the run's marker and run.json one level up), for a tiny untrained model."""
    directory.mkdir(parents=True)
    (directory.parent / rundir.MARKER).write_text("{}")
    (directory.parent / rundir.RUN_FILE).write_text(json.dumps({"models": [directory.name]}))
    model.save(directory / "model.keras")
    (directory / "history.csv").write_text(
        "epoch,accuracy,learning_rate,loss,val_accuracy,val_loss\n"
        "0,0.5,0.001,1.5,0.55,1.4\n1,0.7,0.001,1.0,0.72,0.9\n2,0.8,0.0005,0.8,0.74,0.95\n"
    )
    TrainConfig(model="cnn", epochs=3, seed=0, val_split=0.1).save(directory / "config.json")
    (directory / "metrics.json").write_text(json.dumps({"model": "cnn", "best_epoch": best_epoch, "epochs_run": 3,
                                                        "backend": "torch"}))
    return directory


def make_cnn_runs(root, names=("a", "b")):
    """Tiny untrained CNNs of one split (seed 0), ROOT/NAME/cnn, as train writes them; the Nth is built with seed N."""
    made = []
    for seed, name in enumerate(names):
        keras.utils.set_random_seed(seed)
        made.append(make_run_dir(root / name / "cnn", build_cnn(filters=(4, 8), dense_units=16, seed=seed)))
    return made


@pytest.fixture
def cnn_run(tmp_path):
    keras.utils.set_random_seed(0)
    return make_run_dir(tmp_path / "run" / "cnn", build_cnn(filters=(4, 8), dense_units=16, seed=0))


def run_cli(data_dir, *args):
    return evaluate.main([*map(str, args), "--data-dir", str(data_dir), "--no-verify"])


def test_help_is_fast_and_imports_no_keras():
    code = "import sys; from fmnist_keras import evaluate; evaluate.build_parser().format_help(); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fmnist_keras.evaluate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--image-index N" in out.stdout and "(default: 0)" in out.stdout
    assert time.perf_counter() - start < 5


def _ten_views(x):
    """The image, its copies moved by one pixel down, up, right and left, each with its mirror image: made by
    padding with a pixel of zeros and cropping, independently of fmnist_keras.tta."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = []
    for rows, columns in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        moved = np.ascontiguousarray(padded[:, 1 - rows:29 - rows, 1 - columns:29 - columns])
        views += [moved, np.ascontiguousarray(moved[:, :, ::-1])]
    return views


def test_tta_follows_the_run_unless_told(cnn_run, tiny_data_dir, tmp_path, capsys):
    (_, _), (x_test, y_test) = load_data(tiny_data_dir, verify=False)
    model = keras.saving.load_model(cnn_run / "model.keras")
    x = to_model_input(x_test)
    views = [model.predict(view, verbose=0) for view in _ten_views(x)]
    plain, mirrored = views[:2]
    expected = {"flip-shifts": float((np.mean(views, axis=0).argmax(1) == y_test).mean()),
                "flip": float(((plain + mirrored).argmax(1) == y_test).mean()),
                "none": float((plain.argmax(1) == y_test).mean())}

    def evaluated(path, *flags):
        assert run_cli(tiny_data_dir, path, "--no-report", *flags) == 0
        out_dir = evaluate.default_out_dir(path if path.suffix else path / "model.keras")
        result = json.loads((out_dir / "evaluation.json").read_text())
        return result["test_time_augmentation"], result["test"]["loss"], result["test"]["accuracy"]

    # The CNN's run: flip and shifts (its defaults).
    both, flip, none = evaluated(cnn_run), evaluated(cnn_run, "--tta", "flip"), evaluated(cnn_run, "--tta", "none")
    assert both[0] == ("mean over the image, its copies shifted by one pixel up, down, left and right, "
                       "and the mirror images of all five")
    assert (flip[0], none[0]) == ("mean over the image and its mirror image", "none")
    assert (both[2], flip[2], none[2]) == tuple(pytest.approx(expected[k]) for k in ("flip-shifts", "flip", "none"))
    assert len({both[1], flip[1], none[1]}) == 3  # the probabilities differ, so the settings are told apart
    assert evaluated(cnn_run, "--tta", "flip-shifts")[1:] == both[1:]
    assert evaluated(cnn_run, "--tta", "shifts")[0] == (
        "mean over the image and its copies shifted by one pixel up, down, left and right")
    TrainConfig(model="cnn", shift_tta=False).save(cnn_run / "config.json")
    assert evaluated(cnn_run)[1:] == flip[1:]
    TrainConfig(model="cnn", flip_tta=False, shift_tta=False).save(cnn_run / "config.json")
    assert evaluated(cnn_run)[1:] == none[1:] and evaluated(cnn_run, "--tta", "flip")[1:] == flip[1:]
    bare = tmp_path / "bare" / "cnn.keras"  # no config.json next to it: no TTA unless asked
    bare.parent.mkdir()
    model.save(bare)
    assert evaluated(bare)[1:] == none[1:]
    # A link to the run's model: the run's config.json, where the model really lies, not the link's folder's.
    TrainConfig(model="cnn", shift_tta=False).save(cnn_run / "config.json")
    link = tmp_path / "links" / "best.keras"
    link.parent.mkdir()
    link.symlink_to(cnn_run / "model.keras")
    assert run_cli(tiny_data_dir, link, "--no-report", "--out-dir", tmp_path / "via-link") == 0
    assert json.loads((tmp_path / "via-link" / "evaluation.json").read_text())["test"]["loss"] == flip[1]
    os.mkfifo(bare.parent / "config.json")  # not a file: named, never taken for "no config.json"
    assert run_cli(tiny_data_dir, bare, "--no-report") == 1
    assert "config.json is not a regular file" in capsys.readouterr().err
    (cnn_run / "config.json").write_text('{"notes": "not a run configuration"}')
    assert run_cli(tiny_data_dir, cnn_run, "--no-report") == 1
    assert "--tta none, flip, shifts or flip-shifts does without it" in capsys.readouterr().err
    assert evaluated(cnn_run, "--tta", "none")[1:] == none[1:]


def test_the_report_follows_the_tta_it_was_given_not_the_runs(cnn_run, tiny_data_dir):
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    (cnn_run / "metrics.json").write_text(json.dumps({**metrics, "test_time_augmentation":
                                                      "mean over the image and its mirror image"}))
    assert run_cli(tiny_data_dir, cnn_run, "--tta", "none", "--layers", "block1_conv1") == 0
    report = (cnn_run / "report.md").read_text()
    assert "test_time_augmentation: none" in report
    result = json.loads((cnn_run / "evaluation.json").read_text())
    (overall, *_) = [line for line in report.splitlines() if line.startswith("| test |")]
    assert f"{result['test']['accuracy']:.4f}" in overall


def test_evaluate_run_dir_writes_metrics_and_full_report(cnn_run, tiny_data_dir, capsys):
    assert run_cli(tiny_data_dir, cnn_run, "--validation", "--image-index", "3") == 0
    out = capsys.readouterr().out
    assert "test: 100 images" in out and "validation: 40 images" in out and "Trouser" in out
    result = json.loads((cnn_run / "evaluation.json").read_text())
    # The metrics are those of the model's own predictions on the test set, averaged over the
    # shifted and mirror images as the run's configuration says (a CNN: flip_tta and shift_tta).
    (_, _), (x_test, y_test) = load_data(tiny_data_dir, verify=False)
    model = keras.saving.load_model(cnn_run / "model.keras")
    predicted = np.mean([model.predict(view, verbose=0) for view in _ten_views(to_model_input(x_test))], axis=0)
    assert result["test"]["accuracy"] == pytest.approx(float((predicted.argmax(1) == y_test).mean()))
    assert result["test_time_augmentation"].startswith("mean over the image, its copies shifted by one pixel")
    matrix = np.array(result["test"]["confusion_matrix"])
    assert matrix.sum() == 100 and list(result["test"]["per_class"]) == list(CLASS_NAMES)
    assert result["validation"]["num_examples"] == 40
    assert result["backend"] == keras.backend.backend() and result["test"]["loss"] > 0
    report = (cnn_run / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {os.path.basename(p) for p in linked} == {
        "curves.png", "confusion_matrix.png", "misclassified.png", "samples.png", "embedding.png",
        "filters.png", "feature_maps.png", "saliency.png",
    }
    for path in linked:
        data = (cnn_run / path).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert "| test | 100 |" in report and "| validation | 40 |" in report
    assert "best_epoch: 2" in report and "Test image 3" in report


def test_evaluate_model_file_into_out_dir_with_chosen_layers(cnn_run, tiny_data_dir, tmp_path):
    out_dir = tmp_path / "elsewhere"
    code = run_cli(tiny_data_dir, cnn_run / "model.keras", "--out-dir", out_dir, "--layers", "block1_conv1", "block2_pool")
    assert code == 0
    assert (out_dir / "evaluation.json").is_file() and (out_dir / "figures" / "feature_maps.png").is_file()
    assert "layers block1_conv1, block2_pool" in (out_dir / "report.md").read_text()
    assert not (cnn_run / "report.md").exists()


def test_mlp_report_has_saliency_but_no_conv_figures(tmp_path, tiny_data_dir):
    keras.utils.set_random_seed(0)
    run = make_run_dir(tmp_path / "run" / "mlp", build_mlp(units=(16,)))
    assert run_cli(tiny_data_dir, run, "--no-report") == 0
    assert not (run / "report.md").exists() and (run / "evaluation.json").is_file()
    assert run_cli(tiny_data_dir, run) == 0
    figures = {p.name for p in (run / "figures").iterdir()}
    assert "saliency.png" in figures and "embedding.png" in figures
    assert "filters.png" not in figures and "feature_maps.png" not in figures


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("not-a-model", r"has suffix '\.txt'; expected a \.keras file"),
        ("empty-dir", r"is a directory without model\.keras"),
        ("bad-layer", r"no layer named 'block9_conv1'; valid layer names: .*block1_conv1"),
        ("dense-layer", r"layer 'embedding' of model '\w+' outputs \(None, 16\), not feature maps \(images, "
                        r"height, width, channels\); name a layer with maps: .*block1_conv1, .*block2_pool"),
        ("bad-index", r"image index 100 is out of range for 100 test images; choose 0 to 99"),
        ("mlp-layers", r"feature maps needs a convolutional layer, but model 'mlp' has none"),
        ("no-config", r"--validation needs .*config\.json"),
    ],
)
def test_bad_input_gets_one_line_error(case, pattern, cnn_run, tiny_data_dir, tmp_path, capsys):
    args = {
        "bad-layer": [cnn_run, "--layers", "block9_conv1"],
        "dense-layer": [cnn_run, "--layers", "block1_conv1", "embedding"],  # before the data is read, or any figure
        "bad-index": [cnn_run, "--image-index", "100"],
    }.get(case)
    if case == "not-a-model":
        (tmp_path / "notes.txt").write_text("hello")
        args = [tmp_path / "notes.txt"]
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty"]
    elif case == "mlp-layers":
        run = make_run_dir(tmp_path / "mlp", build_mlp(units=(8,)))
        args = [run, "--layers", "dense1"]
    elif case == "no-config":
        (cnn_run / "config.json").unlink()
        args = [cnn_run, "--validation"]
    assert run_cli(tiny_data_dir, *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(pattern, err), err


def test_model_saved_under_another_backend_evaluates_here(tmp_path, tiny_data_dir):
    other = "jax" if keras.backend.backend() != "jax" else "torch"
    script = (
        "import keras, numpy as np; from fmnist_keras.models import build_cnn; from fmnist_keras.data import "
        f"load_data, to_model_input; keras.utils.set_random_seed(3); m = build_cnn(filters=(4, 8), dense_units=16);"
        f"m.save(r'{tmp_path / 'model.keras'}'); (_, _), (x, y) = load_data(r'{tiny_data_dir}', verify=False);"
        f"np.save(r'{tmp_path / 'probs.npy'}', keras.ops.convert_to_numpy(m(to_model_input(x), training=False)))"
    )
    env = {**os.environ, "KERAS_BACKEND": other, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)  # generous: CI machines may be loaded
    assert run_cli(tiny_data_dir, tmp_path / "model.keras", "--no-report") == 0
    result = json.loads((tmp_path / "model-evaluation" / "evaluation.json").read_text())  # beside model.keras
    (_, _), (_, y_test) = load_data(tiny_data_dir, verify=False)
    probabilities = np.load(tmp_path / "probs.npy")
    assert result["test"]["accuracy"] == pytest.approx(float((probabilities.argmax(1) == y_test).mean()))
    expected_loss = -np.mean(np.log(probabilities[np.arange(len(y_test)), y_test]))
    assert result["test"]["loss"] == pytest.approx(expected_loss, rel=1e-4)


# ---- damaged run files, blocked outputs, the run directory train prints ------------


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _damage(run, case):
    config = json.loads((run / "config.json").read_text())
    if case == "config-not-json":
        (run / "config.json").write_text('{"model": "cnn", ')
    elif case == "config-wrong-type":
        (run / "config.json").write_text(json.dumps({**config, "seed": "forty-two"}))
    elif case == "config-bool-for-int":
        (run / "config.json").write_text(json.dumps({**config, "val_split": True}))
    elif case == "config-unknown-key":
        (run / "config.json").write_text(json.dumps({**config, "dropout": 0.5}))
    elif case == "config-a-list":
        (run / "config.json").write_text("[1, 2]")
    elif case == "config-deep":
        (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "config-bad-value":
        (run / "config.json").write_text(json.dumps({**config, "val_split": 1.5}))
    elif case == "config-splits-nothing":  # in range, but 5 images cannot hold a split of every class
        (run / "config.json").write_text(json.dumps({**config, "subset": 5}))
    elif case == "metrics-garbage":
        (run / "metrics.json").write_bytes(b"\x00\xff garbage")
    elif case == "metrics-a-list":
        (run / "metrics.json").write_text("[1, 2]")
    elif case == "metrics-wrong-type":
        (run / "metrics.json").write_text(json.dumps({"model": "cnn", "best_epoch": "two"}))
    elif case == "metrics-wrong-validation":
        (run / "metrics.json").write_text(json.dumps({"model": "cnn", "validation": {"x": 1}}))
    elif case == "metrics-huge-numbers":  # JSON integers of any size; no float holds these
        (run / "metrics.json").write_text(json.dumps({"model": "cnn", "best_epoch": 10**400}))
    elif case == "metrics-huge-accuracy":
        validation = {"num_examples": 6000, "accuracy": 10**400, "macro_f1": 0.9, "loss": 0.3}
        (run / "metrics.json").write_text(json.dumps({"model": "cnn", "validation": validation}))
    elif case == "model-truncated":
        data = (run / "model.keras").read_bytes()
        (run / "model.keras").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("config-not-json", r"config\.json is damaged: not valid JSON for the run's configuration \(.*\); restore it"),
        ("config-wrong-type", r"config\.json is damaged: seed is 'forty-two'; expected a whole number from 0 to"),
        ("config-bool-for-int", r"config\.json is damaged: val_split is True; expected a number from 0\.001"),
        ("config-unknown-key", r"config\.json is damaged: unknown configuration keys \['dropout'\]"),
        ("config-a-list", r"config\.json is damaged: expected a JSON object of settings, got list"),
        ("config-deep", r"config\.json is damaged: not valid JSON for the run's configuration \(.*recursion"),
        ("config-bad-value", r"config\.json is damaged: val_split is 1\.5; expected a number from 0\.001 to 0\.999"),
        ("config-splits-nothing", r"config\.json does not rebuild a split of this data \(a subset of 5 images cannot"),
        ("metrics-garbage", r"metrics\.json is damaged: not valid JSON for the run's metrics"),
        ("metrics-a-list", r"metrics\.json is damaged: a JSON list, not an object; rewrite it with train"),
        ("metrics-wrong-type", r"metrics\.json is damaged: best_epoch is 'two'; expected an epoch number or null"),
        ("metrics-wrong-validation", r"metrics\.json is damaged: validation is \{'x': 1\}; expected the metrics of a split"),
        ("metrics-huge-numbers", r"metrics\.json is damaged: best_epoch is 1000000000.*; expected an epoch number"),
        ("metrics-huge-accuracy", r"metrics\.json is damaged: validation is .*; expected the metrics of a split"),
        ("model-truncated", r"model\.keras is not a zip archive .* It may be truncated"),
    ],
)
def test_damaged_run_file_gets_one_line_naming_it(case, pattern, cnn_run, tiny_data_dir, capsys):
    _damage(cnn_run, case)
    assert run_cli(tiny_data_dir, cnn_run, "--validation") == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and str(cnn_run) in err
    assert re.search(pattern, err), err
    assert not (cnn_run / "evaluation.json").exists()


@pytest.mark.parametrize("below", [False, True])
def test_out_dir_blocked_by_a_file_is_refused_before_any_work(below, cnn_run, tiny_data_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    out_dir = tmp_path / "afile" / "eval" if below else tmp_path / "afile"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_data_dir, cnn_run, "--out-dir", out_dir)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    expected = f"lies below {tmp_path / 'afile'}, which is a file" if below else "is a file, not a directory"
    assert expected in last and "choose another --out-dir" in last
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("blank", ["", " "])
def test_an_empty_out_dir_is_a_usage_error_not_the_models_directory(blank, cnn_run, tiny_data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_data_dir, cnn_run, "--out-dir", blank)
    assert exit_info.value.code == 2
    assert "argument --out-dir: expected a path, got an empty string" in capsys.readouterr().err
    assert not (cnn_run / "evaluation.json").exists()


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_out_dir_that_is_a_broken_link_is_named_as_one(link, tmp_path):
    from fmnist_keras.evaluate import RunFileError, check_out_dir

    if link == "dangling":
        (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "out").symlink_to("back")
        (tmp_path / "back").symlink_to("out")
    with pytest.raises(RunFileError, match="is a symbolic link to nothing \\(or a loop of links\\), not a directory"):
        check_out_dir(tmp_path / "out")
    assert (tmp_path / "out").is_symlink()


def test_evaluation_json_is_strict_and_replaced_atomically(cnn_run, tiny_data_dir, monkeypatch, capsys):
    (cnn_run / "evaluation.json").write_text('{"old": true}\n')

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(rundir.os, "replace", failing_replace)  # the one atomic writer
        assert run_cli(tiny_data_dir, cnn_run, "--no-report") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "No space left on device" in err
    assert (cnn_run / "evaluation.json").read_text() == '{"old": true}\n'
    assert run_cli(tiny_data_dir, cnn_run, "--no-report") == 0
    assert _strict_json((cnn_run / "evaluation.json").read_text())["test"]["num_examples"] == 100
    assert not [p.name for p in cnn_run.iterdir() if p.name.startswith(".")]  # no temporary left


def test_model_with_non_finite_outputs_writes_no_evaluation(tmp_path, tiny_data_dir, capsys):
    model = build_mlp(units=(4,))
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    run = make_run_dir(tmp_path / "run" / "mlp", model)
    assert run_cli(tiny_data_dir, run, "--no-report") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gives NaN or infinite outputs on the test set" in err
    assert not (run / "evaluation.json").exists()


def test_evaluate_accepts_the_run_directory_train_prints(cnn_run, tiny_data_dir, capsys):
    run = cnn_run.parent  # runs/<name>/ holding cnn/
    (run / "run.json").write_text('{"models": ["cnn"]}\n')
    assert run_cli(tiny_data_dir, run, "--no-report") == 0
    assert f"Using {cnn_run / 'model.keras'}" in capsys.readouterr().err
    assert (cnn_run / "evaluation.json").is_file()
    make_run_dir(run / "mlp", build_mlp(units=(4,)))
    assert run_cli(tiny_data_dir, run, "--no-report") == 2
    assert capsys.readouterr().err == (f"error: {run} holds several models (cnn, mlp); pass one of {run / 'cnn'}, "
                                       f"{run / 'mlp'}.\n")


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_seed_out_of_numpy_range_is_a_usage_error(seed, cnn_run, tiny_data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_data_dir, cnn_run, "--seed", seed)
    assert exit_info.value.code == 2 and "argument --seed" in capsys.readouterr().err


# --- what evaluate writes: never through a link, never over what it did not write -----------


@pytest.mark.parametrize("planted", ["report.md", "figures", "figures/curves.png", "evaluation.json"])
def test_evaluate_never_writes_through_a_link(cnn_run, tiny_data_dir, tmp_path, capsys, planted):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "curves.png").write_text("mine")
    target = victim if planted == "figures" else victim / "curves.png"
    if planted.startswith("figures/"):
        (cnn_run / "figures").mkdir()
    (cnn_run / planted).symlink_to(target)
    assert run_cli(tiny_data_dir, cnn_run) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "is a symbolic link" in err, err
    assert [p.name for p in victim.iterdir()] == ["curves.png"] and (victim / "curves.png").read_text() == "mine"
    assert not (cnn_run / "evaluation.json").exists() or planted == "evaluation.json"


def test_evaluate_never_replaces_files_in_a_directory_it_did_not_write(cnn_run, tiny_data_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "report.md").write_text("my report")
    (mine / "figures" / "curves.png").write_text("my figure")
    thesis = tmp_path / "thesis"  # none of evaluate's outputs in it, but files of the user's
    thesis.mkdir()
    (thesis / "chapter1.md").write_text("years of work")
    for out_dir in (mine, thesis):
        before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
        assert run_cli(tiny_data_dir, cnn_run, "--out-dir", out_dir) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "holds files evaluate did not write" in err, err
        assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before  # and nothing added
    # A directory evaluate made itself is its own to write again, as long as it holds only evaluate's outputs.
    fresh = tmp_path / "fresh"
    assert run_cli(tiny_data_dir, cnn_run, "--out-dir", fresh, "--no-report") == 0
    assert run_cli(tiny_data_dir, cnn_run, "--out-dir", fresh) == 0
    assert (fresh / evaluate.OUTPUT_MARKER).is_file() and (fresh / "report.md").is_file()
    (fresh / "notes.txt").write_text("mine")
    assert run_cli(tiny_data_dir, cnn_run, "--out-dir", fresh) == 1
    assert "notes.txt is not an output of evaluate" in capsys.readouterr().err
    assert (fresh / "notes.txt").read_text() == "mine"


def test_a_users_directory_that_appears_while_the_model_is_evaluated_is_left_alone(cnn_run, tiny_data_dir,
                                                                                    tmp_path, monkeypatch, capsys):
    from fmnist_keras import data as fdata

    out_dir, real_load = tmp_path / "userdir", fdata.load_data

    def load_while_the_user_writes(*args, **kwargs):
        out_dir.mkdir()
        (out_dir / "evaluation.json").write_text("the user's")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fdata, "load_data", load_while_the_user_writes)
    assert run_cli(tiny_data_dir, cnn_run, "--out-dir", out_dir, "--no-report") == 1
    assert "error: while the model was evaluated, " in capsys.readouterr().err
    assert [p.name for p in out_dir.iterdir()] == ["evaluation.json"]
    assert (out_dir / "evaluation.json").read_text() == "the user's"


def test_what_a_killed_evaluate_left_is_its_own_and_a_fifo_is_not(tmp_path):
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / evaluate.OUTPUT_MARKER).write_text("{}")
    (out_dir / ".partial-evaluation.json.abc123").write_text("{")  # rundir.replacing's, cut by SIGKILL
    assert not evaluate.check_outputs(out_dir, tmp_path / "m.keras")
    os.mkfifo(out_dir / "report.md")
    with pytest.raises(evaluate.RunFileError, match="report.md is not a regular file, in the way of the report"):
        evaluate.check_outputs(out_dir, tmp_path / "m.keras")


def test_a_file_where_the_default_output_goes_is_refused_before_the_data_is_read(cnn_run, tiny_data_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    from fmnist_keras import data as fdata

    (tmp_path / "m.keras").write_bytes((cnn_run / "model.keras").read_bytes())
    (tmp_path / "m-evaluation").write_text("a file of the user's")
    monkeypatch.setattr(fdata, "load_data", lambda *a, **k: pytest.fail("the data was read"))
    assert run_cli(tiny_data_dir, tmp_path / "m.keras") == 1
    assert "m-evaluation is a file, not a directory" in capsys.readouterr().err


def test_a_model_file_outside_a_run_is_evaluated_into_a_directory_of_its_own(cnn_run, tiny_data_dir, tmp_path):
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    (downloads / "fashion.keras").write_bytes((cnn_run / "model.keras").read_bytes())
    (downloads / "report.md").write_text("a report of the user's")
    (downloads / "notes.txt").write_text("mine")
    for extra in ([], ["--no-report"]):  # and again, with its outputs there: the directory is evaluate's
        assert run_cli(tiny_data_dir, downloads / "fashion.keras", *extra) == 0
    assert sorted(p.name for p in downloads.iterdir()) == ["fashion-evaluation", "fashion.keras", "notes.txt",
                                                          "report.md"]
    assert (downloads / "report.md").read_text() == "a report of the user's"
    assert (downloads / "fashion-evaluation" / "report.md").read_text().startswith("# Report")


def test_only_the_model_directory_of_the_model_evaluated_counts_as_the_runs_own(tmp_path):
    from fmnist_keras.rundir import RunDir

    run = RunDir.create(str(tmp_path / "runs"), "r", ["mlp", "cnn"])
    user = tmp_path / "user"
    for directory in (run.check_model_dir("mlp"), run.check_model_dir("cnn"), run.path / "notes", user):
        directory.mkdir(exist_ok=True)
        (directory / "report.md").write_text("a report")
    (run.path / "shared").symlink_to(user, target_is_directory=True)
    mlp = run.path / "mlp"
    assert evaluate.check_outputs(mlp, mlp / "model.keras")  # its own model directory: evaluate may replace its report
    with pytest.raises(evaluate.RunFileError, match="is a run's model directory, whose report is that of its own"):
        evaluate.check_outputs(run.path / "cnn", mlp / "model.keras")
    for out_dir in (run.path / "notes", run.path / "shared"):  # not listed in run.json; a link to the user's
        with pytest.raises(evaluate.RunFileError, match="holds files evaluate did not write"):
            evaluate.check_outputs(out_dir, mlp / "model.keras")
    assert not evaluate.check_outputs(tmp_path / "new", mlp / "model.keras")  # not a run's: evaluate marks it
    (mlp / "model.keras").write_text("a model")
    (mlp / "mine.keras").write_text("another model, copied into the run's directory")
    assert evaluate.default_out_dir(mlp / "mine.keras") == mlp / "mine-evaluation"  # not the run's report
    with pytest.raises(evaluate.RunFileError, match="is a run's model directory, whose report is that of its own"):
        evaluate.check_outputs(mlp, mlp / "mine.keras")
    assert (user / "report.md").read_text() == "a report"


def test_a_marker_that_is_a_link_makes_no_directory_the_projects(tmp_path):
    # Planted in a user's directory, a link to any file must not make evaluate replace the user's report.
    from fmnist_keras.rundir import MARKER, RUN_FILE, is_model_dir

    (tmp_path / "anything").write_text("{}")
    user = tmp_path / "user"
    (user / "mlp").mkdir(parents=True)
    (user / "report.md").write_text("my report")
    (user / "mlp" / "report.md").write_text("my report")
    (user / evaluate.OUTPUT_MARKER).symlink_to(tmp_path / "anything")
    (user / MARKER).symlink_to(tmp_path / "anything")
    (user / RUN_FILE).write_text('{"models": ["mlp"]}')
    assert not is_model_dir(user / "mlp")
    for out_dir in (user, user / "mlp"):
        with pytest.raises(evaluate.RunFileError, match="holds files evaluate did not write"):
            evaluate.check_outputs(out_dir, user / "mlp" / "model.keras")
    assert (user / "report.md").read_text() == (user / "mlp" / "report.md").read_text() == "my report"


def test_a_run_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    import os

    from fmnist_keras.rundir import MARKER, RUN_FILE, is_model_dir, read_json

    run = tmp_path / "run"
    (run / "mlp").mkdir(parents=True)
    (run / MARKER).write_text("{}")
    os.mkfifo(run / RUN_FILE)  # reading it would block until someone writes
    with pytest.raises(rundir.RunDirError, match="is not a regular file"):
        read_json(run / RUN_FILE, "the run's list of models", "start a new run")
    assert not is_model_dir(run / "mlp")


@pytest.mark.parametrize("flags, fast", [([], True), (["--no-fast-path"], False)], ids=["default", "no-fast-path"])
def test_evaluation_follows_the_fast_path_flag_and_keeps_freed_memory(
        cnn_run, tiny_data_dir, monkeypatch, flags, fast, fast_path_requests):
    kept = []
    monkeypatch.setattr(evaluate, "keep_freed_memory", lambda: kept.append(True))
    assert run_cli(tiny_data_dir, cnn_run, "--no-report", "--validation", *flags) == 0
    assert fast_path_requests == [fast] * 2 and kept == [True]  # the test and validation predictions


def test_run_files_of_another_model_give_a_note_and_stay_out_of_the_report(cnn_run, tiny_data_dir, capsys):
    # A metrics.json beside the model that describes another model (a .keras file copied into a run) would put
    # that model's facts and training curves beside this one's figures.
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    (cnn_run / "metrics.json").write_text(json.dumps({**metrics, "num_params": 7}))
    assert run_cli(tiny_data_dir, cnn_run) == 0
    params = keras.saving.load_model(cnn_run / "model.keras").count_params()
    assert capsys.readouterr().err.strip().endswith(
        f"note: {cnn_run / 'metrics.json'} describes a model of 7 parameters, not {cnn_run / 'model.keras'} "
        f"({params:,}); the report leaves out its facts and training curves (--tta run and --validation still read "
        f"config.json there).")
    report = (cnn_run / "report.md").read_text()
    assert "best_epoch" not in report and "curves.png" not in report and "figures/saliency.png" in report
    (cnn_run / "metrics.json").write_text(json.dumps({**metrics, "num_params": params}))
    assert run_cli(tiny_data_dir, cnn_run) == 0
    report = (cnn_run / "report.md").read_text()
    assert "note:" not in capsys.readouterr().err and "best_epoch: 2" in report and "curves.png" in report
