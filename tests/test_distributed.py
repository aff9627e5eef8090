"""Data-parallel training on CPU: torchrun with gloo (torch) and two host devices (JAX).

Every test starts real processes: torchrun's workers, or a JAX process whose
XLA exposes two CPU devices. They check that one data-parallel step gives the
weights of one process (or one device) taking the whole batch, that the
replicas end training with identical weights, that one complete run directory
is written, and that bad set-ups fail on every rank with one clear line instead
of hanging.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from packaging.version import Version

pytestmark = pytest.mark.slow
# Marked torchrun: the tests whose ranks train through Keras's torch trainer (which keras-nightly wraps in
# DistributedDataParallel, and older Keras does not), which CI runs on every Keras version it tests. A
# set-up that fails before training, and SIGINT (torchrun passes it on as it passes SIGTERM), do not
# depend on the Keras version: they run in the torch pass alone.

TRAIN = ["-m", "fmnist_keras.train", "--model", "mlp", "--no-verify", "--no-report", "--epochs", "3",
         "--batch-size", "32", "--run-name", "run"]
RUN_FILES = {"model.keras", "history.csv", "config.json", "fit.json", "metrics.json"}


def _env(backend: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def _torchrun(*args, nproc=2, timeout=300):
    return subprocess.run(_torchrun_command(*args, nproc=nproc), capture_output=True, text=True, env=_env("torch"),
                          timeout=timeout)


def _start_ranks(*args, world=2):
    """Each rank of a torchrun-style launch as a process of its own (WORLD_SIZE, RANK, ...), all at once.

    Unlike torchrun, nothing stops the other ranks when one fails first, so every rank's own
    failure can be checked, and a signal can go to one rank alone.
    """
    port = str(_free_port())
    return [
        subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env("torch", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for rank in range(world)
    ]


def _ranks(*args, world=2, timeout=300):
    """:func:`_start_ranks`, waiting for every rank to end."""
    procs = _start_ranks(*args, world=world)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _single(backend, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env or _env(backend), timeout=timeout)


def _metrics(out_dir):
    return json.loads((out_dir / "run" / "mlp" / "metrics.json").read_text())


def _check_run_dir(out_dir):
    assert sorted(p.name for p in out_dir.iterdir()) == ["latest", "run"]  # one run directory, written once
    assert not any(p.name.startswith(".partial") for p in (out_dir / "run").iterdir())
    files = {p.name for p in (out_dir / "run" / "mlp").iterdir()}
    assert RUN_FILES <= files and not any(name.startswith(".partial") for name in files)


@pytest.mark.torchrun
def test_torchrun_two_processes_keep_identical_replicas_and_write_one_run(tmp_path, tiny_data_dir):
    ddp = _torchrun(*TRAIN, "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[:3000]
    _check_run_dir(tmp_path / "ddp")
    metrics = _metrics(tmp_path / "ddp")
    replicas = metrics["distributed"]
    assert replicas["mode"] == "torchrun" and replicas["world_size"] == 2
    assert replicas["collective_backend"] == "gloo" and replicas["devices"] == ["rank0:cpu", "rank1:cpu"]
    assert replicas["global_batch_size"] == 32 and replicas["per_replica_batch_size"] == 16
    assert replicas["replicas_identical"] and len(set(replicas["replica_weight_digests"])) == 1
    assert ddp.stdout.count("Backend: torch") == 1  # rank 0 alone prints
    # Each replica saw half of every epoch: 360 images / 2 ranks / 16 per batch = 12 steps (ceil).
    assert "12/12" in ddp.stdout

    # Keras 3.16 wraps the model in DistributedDataParallel itself; older Keras leaves it to ReplicaSync's hooks.
    keras_ddp = Version(keras.__version__) >= Version("3.16.0.dev0")
    assert metrics["gradient_averaging"] == ("keras DistributedDataParallel" if keras_ddp else "gradient hooks")
    assert metrics["test"]["accuracy"] >= 0.5  # learned (10 classes: chance is 0.1)


@pytest.mark.parametrize("launch", [pytest.param("torchrun", marks=pytest.mark.torchrun), "jax"])
def test_cutmix_trains_data_parallel_with_identical_replicas(launch, tmp_path, tiny_data_dir):
    args = [*TRAIN, "--epochs", "1", "--cutmix", "1", "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path)]
    if launch == "torchrun":
        out = _torchrun(*args)
    else:
        out = _single("jax", *args, "--distribute",
                      env=_env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "mlp" / "config.json").read_text())["cutmix"] == 1.0
    replicas = _metrics(tmp_path)["distributed"]
    assert replicas["mode"] == launch and replicas["replicas_identical"]
    assert "CutMix on 100% of the batches" in out.stdout


STEP_WORKER = str(Path(__file__).with_name("data_parallel_step_worker.py"))


def _assert_same_weights_after_one_step(parallel_dir: Path, one_dir: Path) -> None:
    assert (parallel_dir / "replicas.txt").read_text() == "2\n"  # the step really ran on two replicas
    assert (one_dir / "replicas.txt").read_text() == "1\n"
    for optimizer in ("sgd", "recipe"):
        with np.load(parallel_dir / f"{optimizer}.npz") as parallel_weights, \
                np.load(one_dir / f"{optimizer}.npz") as one_weights:
            assert len(parallel_weights.files) == 4
            for name in one_weights.files:
                np.testing.assert_allclose(parallel_weights[name], one_weights[name], rtol=0, atol=1e-6,
                                           err_msg=f"{optimizer}: weight {name}")


@pytest.mark.torchrun
def test_torchrun_one_step_of_two_ranks_by_16_gives_the_weights_of_one_process_by_32(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = _torchrun(STEP_WORKER, str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = _single("torch", STEP_WORKER, str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_weights_after_one_step(tmp_path / "ddp", tmp_path / "one")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_jax_one_step_over_two_devices_gives_the_weights_of_one_device(tmp_path):
    env = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = _single("jax", STEP_WORKER, str(tmp_path / "two"), "jax", "--distribute", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _single("jax", STEP_WORKER, str(tmp_path / "one"), "jax", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_weights_after_one_step(tmp_path / "two", tmp_path / "one")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_jax_data_parallel_over_two_host_devices(tmp_path, tiny_data_dir):
    env = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = _single("jax", *TRAIN, "--distribute", "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path / "dp"),
                  env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_run_dir(tmp_path / "dp")
    replicas = _metrics(tmp_path / "dp")["distributed"]
    assert replicas["mode"] == "jax" and replicas["devices"] == ["cpu:0", "cpu:1"]
    assert replicas["per_replica_batch_size"] == 16 and replicas["replicas_identical"]
    assert "Data parallel (jax): 2 replicas" in out.stdout
    # Exactness is the one-step test's job (test_jax_one_step_over_two_devices_...); here, it learned.
    assert _metrics(tmp_path / "dp")["test"]["accuracy"] >= 0.5


# torchrun stops the other ranks as soon as one fails, so whether the slower rank gets to print its
# own error is a race; each rank is started on its own here instead.
def test_torchrun_on_another_backend_fails_on_every_rank(tmp_path, tiny_data_dir):
    for out in _ranks(*TRAIN, "--backend", "jax", "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path)):
        assert out.returncode == 2
        assert out.stderr.count("error: torchrun started 2 processes but the backend is 'jax'") == 1
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_split_over_the_ranks_fails_on_every_rank(tmp_path, tiny_data_dir):
    for out in _ranks(*TRAIN, "--batch-size", "33", "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path)):
        assert out.returncode == 2
        assert out.stderr.count("error: --batch-size 33 does not split evenly over 2 processes") == 1
    assert not (tmp_path / "run").exists()


def test_resume_under_torchrun_fails_on_every_rank_before_either_touches_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("a user's file")
    for out in _ranks("-m", "fmnist_keras.train", "--resume", str(run)):
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert lines == [f"error: --resume continues a run in one process, not under torchrun; run python -m "
                         f"fmnist_keras.train --resume {run} without torchrun."]
    assert [p.name for p in run.iterdir()] == ["keep.txt"]  # no lock file, nothing written or removed


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.torchrun), signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_a_torchrun_run_stopped_by_a_signal_resumes_in_one_process(tmp_path, tiny_data_dir, signum):
    # SIGTERM is what a scheduler sends torchrun; SIGINT is Ctrl-C at a terminal, which reaches torchrun alone
    # (its workers run in sessions of their own). torchrun passes either on to both ranks.
    out, epochs = tmp_path / "out", 30
    stopped = _torchrun_until_two_epochs_then(lambda launcher: launcher.send_signal(signum), out, epochs,
                                              tiny_data_dir).stderr
    name = signal.Signals(signum).name
    assert stopped.count(f"Interrupted ({name}); {out / 'run'} keeps every completed epoch. Continue with: "
                         f"python -m fmnist_keras.train --resume {out / 'run'}") == 1, stopped[-3000:]  # rank 0
    assert stopped.count(f"Interrupted ({name}).") == 1, stopped[-3000:]  # rank 1
    _check_stopped_then_resumed(out, epochs)


def _torchrun_until_two_epochs_then(act, out, epochs, data_dir) -> subprocess.CompletedProcess:
    """torchrun's two ranks on an MLP run of ``epochs`` epochs; ``act(launcher)`` once two are done; torchrun's end."""
    launcher = subprocess.Popen(
        _torchrun_command(*TRAIN, "--epochs", str(epochs), "--patience", str(epochs), "--data-dir", str(data_dir),
                          "--out-dir", str(out)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env("torch"))
    try:
        _wait_for_two_epochs(out, [launcher])
        act(launcher)
        stderr = launcher.communicate(timeout=120)[1]
    finally:
        if launcher.poll() is None:
            _kill_with_workers(launcher)
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, None, stderr)


def _workers(launcher) -> list[int]:
    """torchrun's worker processes, rank 0 first (Linux's /proc lists a process's children in the order started)."""
    try:
        return [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_with_workers(launcher):
    """SIGKILL torchrun and its workers, which run in sessions of their own."""
    for pid in _workers(launcher):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.kill()


def _wait_for_two_epochs(out, procs):
    """Until rank 0's history.csv holds two epochs (every process still running)."""
    history_file = out / "run" / "mlp" / "history.csv"
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if history_file.exists() and history_file.read_text().count("\n") >= 3:  # a header and two epochs
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), [p.stderr.read()[-3000:] for p in procs if p.poll() is not None]


def _check_stopped_then_resumed(out, epochs):
    """The stopped run kept some completed epochs and no result; one process then finishes it, every epoch once."""
    from fmnist_keras.engine.callbacks import read_history

    history_file = out / "run" / "mlp" / "history.csv"
    assert 2 <= len(read_history(history_file)) < epochs
    assert not (out / "run" / "mlp" / "metrics.json").exists()
    resumed = _single("torch", "-m", "fmnist_keras.train", "--resume", str(out / "run"), "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["epoch"] for row in read_history(history_file)] == list(range(epochs))
    metrics = _metrics(out)
    assert metrics["resumed"] and metrics["epochs_run"] == epochs
    _check_run_dir(out)


@pytest.mark.torchrun
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_data_dir):
    # The ranks agree in their per-step all-reduce; a rank stopping alone would leave the other in a collective.
    out, epochs = tmp_path / "out", 30
    ranks = _start_ranks(*TRAIN, "--epochs", str(epochs), "--patience", str(epochs), "--data-dir",
                         str(tiny_data_dir), "--out-dir", str(out), "--dist-timeout", "60")
    try:
        _wait_for_two_epochs(out, ranks)
        ranks[1].send_signal(signal.SIGTERM)  # rank 1 alone
        errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [143, 143], errors
    assert errors[0].strip().splitlines()[-1].endswith(
        f"Continue with: python -m fmnist_keras.train --resume {out / 'run'}"), errors[0][-3000:]
    assert errors[1].strip().splitlines()[-1] == "Interrupted (SIGTERM).", errors[1][-3000:]
    _check_stopped_then_resumed(out, epochs)


@pytest.mark.torchrun
@pytest.mark.parametrize("killed", [0, 1], ids=["rank 0 killed", "rank 1 killed"])
def test_a_rank_killed_mid_training_stops_the_other_with_one_line_and_the_run_resumes(tmp_path, tiny_data_dir,
                                                                                      killed):
    # SIGKILL (the kernel's out-of-memory killer, say) leaves the rank no time to vote: the other rank's next
    # collective fails. Rank 0, the one that writes, killed mid-epoch must leave a run that resumes.
    out, epochs = tmp_path / "out", 30
    ranks = _start_ranks(*TRAIN, "--epochs", str(epochs), "--patience", str(epochs), "--data-dir",
                         str(tiny_data_dir), "--out-dir", str(out), "--dist-timeout", "60")
    survivor = 1 - killed
    try:
        _wait_for_two_epochs(out, ranks)
        ranks[killed].kill()
        ranks[killed].communicate(timeout=60)
        error = ranks[survivor].communicate(timeout=120)[1]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert ranks[survivor].returncode == 1, error[-3000:]
    lines = error.strip().splitlines()
    assert lines[-1].startswith(f"error: rank {survivor} of 2 stopped training (RuntimeError: "), error[-3000:]
    assert "another rank that failed or was killed first" in lines[-1]
    if survivor == 0:
        assert lines[-1].endswith(f"continue with: python -m fmnist_keras.train --resume {out / 'run'}")
    assert "Traceback" not in error
    _check_stopped_then_resumed(out, epochs)


@pytest.mark.torchrun
def test_a_full_disk_on_rank_0_alone_stops_every_rank_with_one_line_each_and_the_run_resumes(tmp_path, tiny_data_dir):
    # Rank 0 alone writes, so only it can find the disk full; rank 1 must not wait for it in a collective.
    out, epochs = tmp_path / "out", 30
    ranks = _ranks(str(Path(__file__).with_name("full_disk_on_rank_0.py")), *TRAIN[2:], "--epochs", str(epochs),
                   "--patience", str(epochs), "--data-dir", str(tiny_data_dir), "--out-dir", str(out),
                   "--dist-timeout", "60")
    assert [rank.returncode for rank in ranks] == [1, 1], [rank.stderr[-3000:] for rank in ranks]
    (rank_0,), (rank_1,) = (rank.stderr.strip().splitlines()[-1:] for rank in ranks)
    assert rank_0.startswith(f"error: train cannot use {out / 'run' / 'mlp'}/"), ranks[0].stderr[-3000:]
    assert rank_0.endswith(f": No space left on device; free some space, then continue the run from its last "
                           f"completed epoch with: python -m fmnist_keras.train --resume {out / 'run'}")
    assert rank_1.startswith("error: rank 1 of 2 stopped training (RuntimeError: "), ranks[1].stderr[-3000:]
    assert not any("Traceback" in rank.stderr for rank in ranks)
    _check_stopped_then_resumed(out, epochs)


# What gloo raised on torch 2.13 when the other rank was killed, and when it did not answer within the timeout.
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:29533")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "3000ms for recv operation to complete")


END_PROCESS = """
import atexit, sys
from fmnist_keras.backend import select_backend
select_backend("torch")
import torch.distributed as dist
from fmnist_keras.engine import distributed
from fmnist_keras.train import end_process
atexit.register(lambda: print(" finalised", flush=True))
case = sys.argv[1]
if case != "no group":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    distributed.shutdown(distributed.Replicas("torchrun", 0, 1, ("rank0:cpu",), "gloo"), in_step=case == "finished")
print("output without its line end", end="")
sys.stderr.write("error: one line")

def entry():
    if case == "raised":
        raise RuntimeError("a bug")
    return 3

end_process(entry)
"""


@pytest.mark.parametrize("case", ["stopped", "raised", "finished", "no group"])
def test_a_rank_that_stopped_out_of_step_ends_without_python_finalisation(tmp_path, case):
    # A rank that stopped out of step with the others leaves its process group open: closing it, or Python's exit
    # with it open, could abort in gloo's C++ code (signal 6 in place of the rank's exit code). Such a rank ends
    # with os._exit instead, its output flushed and a traceback printed; a rank that finished in step closes the
    # group, and it and every other process end as sys.exit ends them.
    result = subprocess.run([sys.executable, "-c", END_PROCESS, case, str(tmp_path / "store")],
                            capture_output=True, text=True, env=_env("torch"), timeout=120)
    assert result.returncode == (1 if case == "raised" else 3), result.stderr[-2000:]
    if case == "raised":
        assert result.stderr.startswith("error: one lineTraceback (most recent call last):")
        assert result.stderr.endswith("RuntimeError: a bug\n")
    else:
        assert result.stderr.endswith("error: one line"), result.stderr[-2000:]
    finalised = " finalised\n" if case in ("finished", "no group") else ""
    assert result.stdout == "output without its line end" + finalised


@pytest.mark.parametrize("error", [
    AttributeError("partially initialized module 'torch' has no attribute 'distributed'"),
    RuntimeError('generic_type: cannot initialize type "RpcBackendOptions"'),
])
def test_a_torch_import_stopped_halfway_by_ctrl_c_ends_with_the_commands_own_line(monkeypatch, capsys, error):
    # A Ctrl-C in the first second of `train` can stop torch's own import and leave torch.distributed half made in
    # sys.modules; asking it whether a group is open then raises from inside torch. No group was opened, so the
    # process ends as sys.exit ends it, with the line main printed and no traceback.
    import types

    from fmnist_keras import train

    half_made = types.ModuleType("torch.distributed")

    def raises():
        raise error

    half_made.is_available = raises
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # half made too: no submodules yet
    monkeypatch.setitem(sys.modules, "torch.distributed", half_made)

    def interrupted():
        print("Interrupted (SIGINT) before training started; nothing was written.", file=sys.stderr)
        return 130

    with pytest.raises(SystemExit) as stop:
        train.end_process(interrupted)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "Interrupted (SIGINT) before training started; nothing was written.\n"


def test_only_a_failed_collective_of_several_torchrun_ranks_counts_as_a_lost_replica():
    import torch.distributed as dist

    from fmnist_keras.engine.distributed import Replicas, lost_a_replica

    two = Replicas("torchrun", 0, 2, ("rank0:cpu", "rank1:cpu"), "gloo")
    for error in (RuntimeError(GLOO_CLOSED), RuntimeError(GLOO_TIMEOUT), dist.DistBackendError("NCCL error")):
        assert lost_a_replica(two, error)
    # Any other error keeps its traceback: a bug, a shape mismatch, a CPU allocation that failed.
    for error in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x784 and 128x10)"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
                  ValueError(GLOO_CLOSED)):
        assert not lost_a_replica(two, error)
    for alone in (Replicas("torchrun", 0, 1, ("rank0:cpu",), "gloo"), Replicas()):  # one rank: no other to lose
        assert not lost_a_replica(alone, RuntimeError(GLOO_CLOSED))


@pytest.mark.torchrun
def test_a_torchrun_worker_killed_mid_training_ends_the_launch_and_the_run_resumes(tmp_path, tiny_data_dir):
    # The other rank's collective fails at once; torchrun, seeing the dead worker, also sends it SIGTERM.
    out, epochs = tmp_path / "out", 30
    launch = _torchrun_until_two_epochs_then(lambda launcher: os.kill(_workers(launcher)[1], signal.SIGKILL), out,
                                             epochs, tiny_data_dir)
    stopped = launch.stderr
    assert launch.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in stopped, stopped[-3000:]  # torchrun's report of rank 1
    run = out / "run"
    # Rank 0's one line: the failed collective, or torchrun's SIGTERM if it came between the failure and the line.
    assert (stopped.count(f"continue with: python -m fmnist_keras.train --resume {run}")
            + stopped.count(f"Interrupted (SIGTERM); {run} keeps every completed epoch. Continue with: ")) == 1
    assert "fmnist_keras/" not in stopped, stopped[-3000:]  # no traceback through the package's code
    _check_stopped_then_resumed(out, epochs)


def test_unreachable_rendezvous_fails_within_the_timeout(tmp_path, tiny_data_dir):
    # Rank 1 of 2 whose rank 0 never comes: it must give up, not hang.
    env = _env("torch", WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    out = _single("torch", *TRAIN, "--dist-timeout", "5", "--data-dir", str(tiny_data_dir),
                  "--out-dir", str(tmp_path), env=env, timeout=120)
    assert out.returncode == 2
    assert "error: rank 1 of 2 could not join the process group at 127.0.0.1:" in out.stderr
    assert "within 5 s" in out.stderr


def test_distribute_flag_is_for_jax(tmp_path, tiny_data_dir):
    out = _single("torch", *TRAIN, "--distribute", "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path))
    assert out.returncode == 2
    assert "--distribute works on the jax backend, not 'torch'; on torch launch torchrun" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_jax_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, tiny_data_dir):
    env = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = _single("jax", *TRAIN, "--distribute", "--batch-size", "33", "--data-dir", str(tiny_data_dir),
                  "--out-dir", str(tmp_path), env=env)
    assert out.returncode == 2
    assert "error: --batch-size 33 does not split evenly over 2 JAX devices; use a multiple of 2" in out.stderr
    assert not (tmp_path / "run").exists()


def test_torchrun_with_a_run_directory_rank_0_cannot_open_stops_every_rank_at_once(tmp_path, tiny_data_dir):
    (tmp_path / "run").mkdir()  # not ours: rank 0 refuses it, and rank 1 must not wait in a collective
    start = time.monotonic()
    out = _torchrun(*TRAIN, "--data-dir", str(tiny_data_dir), "--out-dir", str(tmp_path), "--dist-timeout", "60")
    assert out.returncode != 0
    assert out.stderr.count("was not created by fmnist_keras") == 1  # rank 0's one line
    assert "fmnist_keras/" not in out.stderr  # no traceback through the project's code (torchrun reports the exit)
    assert time.monotonic() - start < 60  # no rank waited for the collective timeout
