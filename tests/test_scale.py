"""Past one machine, on real engines: tune.py workers sharing a study on a PostgreSQL server, and
train.py under torchrun on two nodes (two launchers, one rank each, meeting at a c10d rendezvous)."""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_script
from tests.test_interrupt import launch
from tests.test_tune import tiny_args
from utils.io import load_logits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (initdb, pg_ctl), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(folders[-1]).parent if folders else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (trust authentication, fsync off), run as the
    ``postgres`` user when the tests run as root (the server refuses root); yields its URL."""
    bindir = server_binaries()
    if bindir is None:
        message = "PostgreSQL's server programs (initdb, pg_ctl) are not installed: `make test` installs them " \
                  "(Debian's postgresql package)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="kit-postgres-", dir="/tmp"))  # not under pytest's 0700 folders
    as_user = []
    if os.geteuid() == 0:
        user = next(u for u in ("postgres", "nobody") if _user_exists(u))
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    folder.chmod(0o755)
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, text=True,
                                      timeout=120)
    port, data = free_port(), folder / "data"
    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "kit", "-E", "UTF8", "--no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "server.log", "-w", "-t", "60", "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "kit", "tune")
        yield f"postgresql://kit@127.0.0.1:{port}/tune"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.slow
def test_three_tune_workers_share_a_study_on_postgresql_and_survive_one_killed_midtrial(tiny_data, tmp_path,
                                                                                        postgres):
    """Three workers (two new processes and this one) run one study through postgresql:// together;
    one is killed mid-trial. The other two finish their trials; the first worker to start a trial once
    the killed trial's heartbeats have stopped (the one started later, or the other process when it
    starts late) marks it failed and runs its parameters again; the later worker continues the same
    study; every trial ends in exactly one final state."""
    import optuna

    args = ["tune.py", *tiny_args(tiny_data, tmp_path / "run", "--epochs", "2", "--n-trials", "1", "--storage",
                                  postgres, "--study-name", "s", "--heartbeat", "1", "--pruner", "none",
                                  "--batch-size", "16", "--tuned-config", str(tmp_path / "t.yaml"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    third = {}

    def kill_the_third():  # once its first epoch is done
        third["rc"], third["output"], _ = launch(args, "epoch 1/2", kill_after=0.0)
        third["killed_at"] = time.monotonic()

    watcher = threading.Thread(target=kill_the_third)
    watcher.start()
    run_script(*args)  # one of the two that finish: this process, while the others run
    watcher.join(timeout=600)
    assert third["rc"] == -signal.SIGKILL, third["output"][-3000:]
    killed_at = third["killed_at"]
    out, _ = other.communicate(timeout=600)
    assert other.returncode == 0, out[-3000:]
    time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))  # past the grace period: 2 x heartbeat
    later = run_script(*args)  # a worker started later continues the same study
    study = optuna.load_study(study_name="s", storage=postgres)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 3
    killed = next(t for t in trials if t.state == optuna.trial.TrialState.FAIL)
    (retried,) = [t for t in trials if "failed_trial" in t.system_attrs]  # retried once, by whichever worker
    assert retried.system_attrs["failed_trial"] == killed.number and retried.params == killed.params
    assert killed.number < retried.number and "4 trials {'COMPLETE': 3, 'FAIL': 1}" in later.stdout
    assert (tmp_path / "t.yaml").is_file()


def torchrun(nodes: list[list[str]], args: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """One launcher per entry of ``nodes`` (its torchrun options), started together, each running
    ``train.py *args``; returns their results once all have ended."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *node, "train.py", *args], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in nodes]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    return results


@pytest.mark.slow
def test_two_nodes_train_the_fold_that_two_ranks_of_one_node_train(tiny_data, tmp_path):
    """Two ranks on one node (DDP on gloo): only rank 0 prints and writes, rank 0 builds the decode
    cache and rank 1 maps it, the validation shards are gathered (every row once). torchrun
    --nnodes 2 with a c10d rendezvous on 127.0.0.1 (two launchers of one rank each, as two machines
    would run it) gives the same fold's OOF logits. Both augment per batch (utils/data/batched.py)."""
    import pandas as pd

    train = ["--model", "test_resnet", "--data-dir", str(tiny_data), "--n-folds", "3", "--img-size", "32",
             "--batch-size", "16", "--epochs", "1", "--fold", "1", "--workers", "0", "--progress", "false",
             "--channels-last", "on", "--ema-decay", "0.9", "--grad-accum", "2", "--head", "mlp", "--head-hidden",
             "32", "--layer-decay", "0.8", "--batch-aug", "on"]
    (one_node,) = torchrun([["--nproc-per-node", "2", "--master-port", str(free_port())]],
                           [*train, "--out-dir", str(tmp_path / "one")])
    assert one_node.stdout.count("fold 1 epoch 1/1") == 1
    assert one_node.stdout.count("decoded 288 images once") == 1
    assert one_node.stdout.count("augmented per batch on the device") == 1  # each rank its share of the batch
    folds = pd.read_csv(tmp_path / "one" / "folds.csv")
    ids, _ = load_logits(tmp_path / "one" / "test_resnet" / "fold1" / "oof_logits.npz")
    assert sorted(ids) == sorted(folds.id[folds.fold == 1]) and len(ids) == len(set(ids))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "kit-two-nodes", "--node-rank", str(k)] for k in range(2)]
    results = torchrun(nodes, [*train, "--out-dir", str(tmp_path / "two")])
    assert sum(r.stdout.count("fold 1 epoch 1/1") for r in results) == 1  # one rank 0 over both nodes
    one = load_logits(tmp_path / "one" / "test_resnet" / "fold1" / "oof_logits.npz")
    two = load_logits(tmp_path / "two" / "test_resnet" / "fold1" / "oof_logits.npz")
    assert (one[0] == two[0]).all()
    np.testing.assert_allclose(two[1], one[1], atol=1e-4)
