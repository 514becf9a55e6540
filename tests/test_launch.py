"""``caffelayers train --nproc 2`` through ``torch.multiprocessing`` and two ranks started by
``torchrun``: a clean end (no leaked semaphores, no process left), SIGTERM to the launcher
(both ranks stop at one iteration, rank 0 snapshots), the same weights either way."""

import signal
import sys

import pytest
import test_train
from test_train import assert_same_weights, run_cli, weights
from test_train_signals import Run, assert_all_gone, snapshots, write_run

from caffelayers import CaffeLayersError
from caffelayers.train import INTERRUPTED

toy = test_train.toy  # the image list fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="walks /proc for the run's processes")


def test_nproc_2_ends_clean(toy):
    run = Run(toy, write_run(toy, 8), "--workers", "2", "--nproc", "2")
    run.wait_for(r"Iteration 2 ")
    assert run.finish() == 0, run.stderr
    assert "leaked" not in run.stderr and "Traceback" not in run.stderr
    assert snapshots(toy) == [8]
    # the launcher's tracker, two ranks, their fork servers and workers
    assert len(run.seen) >= 7
    assert_all_gone(run.seen)


def test_signals_to_the_launcher_reach_both_ranks(toy):
    """SIGHUP snapshots and training goes on; SIGTERM stops both ranks with a snapshot
    (with a SIGINT at once, as a terminal and a scheduler may both send)."""
    run = Run(toy, write_run(toy, 100000), "--workers", "1", "--nproc", "2")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGHUP)
    run.wait_for(r"Snapshotting solver state")
    run.send(signal.SIGTERM)
    run.send(signal.SIGINT)  # at once: the same request
    assert run.finish() == INTERRUPTED, run.stderr
    assert "aborted" not in run.stderr
    # the stop may come at the iteration of the requested snapshot, which holds its state
    taken = snapshots(toy)
    assert len(taken) in (1, 2) and 3 <= taken[0] and taken[-1] < 100000
    assert f"snapshot snap/run_iter_{taken[-1]}.caffemodel" in run.stderr
    assert "SIGUSR2 from the launcher: snapshotting after this iteration" in run.stderr
    assert "SIGUSR1 from the launcher: stopping after this iteration" in run.stderr
    assert "leaked" not in run.stderr
    assert_all_gone(run.seen)


def test_torchrun_ranks_train_as_nproc_does(toy):
    write_run(toy, 6)
    (toy / "other.prototxt").write_text((toy / "solver.prototxt").read_text()
                                        .replace("snap/run", "snap/torchrun"))
    run = Run(toy, "--standalone", "--nproc-per-node", "2", "-m", "caffelayers", "train",
              "other.prototxt", "--workers", "0", module=("torch.distributed.run",))
    assert run.finish() == 0, run.stderr
    assert "Use CPU." in run.stderr
    assert run_cli("solver.prototxt", "--workers", "0", "--nproc", "2") == 0
    assert_same_weights(weights("snap/torchrun_iter_6.caffemodel"),
                        weights("snap/run_iter_6.caffemodel"), atol=0)
    assert_all_gone(run.seen)


def test_torchrun_environment_is_one_rank(toy, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    write_run(toy, 2)
    with pytest.raises(CaffeLayersError, match="under torchrun every process is one rank"):
        run_cli("solver.prototxt", "--nproc", "2")
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(CaffeLayersError, match="RANK, WORLD_SIZE and LOCAL_RANK must be "
                                               "integers"):
        run_cli("solver.prototxt")
