"""``caffelayers train``'s signals (Caffe's ``-sigint_effect``/``-sighup_effect``, SIGTERM as
SIGINT), the processes a run leaves (none, however it ends), its log lines (device, seed,
resume, fine-tune), ``--stage``/``--level`` and its loader workers. The signal tests run the
command in a real process and walk ``/proc`` for its descendants."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_train
from test_train import NET, assert_same_weights, run_cli, weights

from caffelayers.data import loader as loader_module
from caffelayers.train import INTERRUPTED, train

toy = test_train.toy  # the image list fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="walks /proc for the run's processes")

SOLVER = '''net: "net.prototxt" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" display: 1
max_iter: {max_iter} snapshot: 0 snapshot_prefix: "snap/run" {extra}
'''


def write_run(folder, max_iter, extra="random_seed: 1", net=None, name="solver.prototxt"):
    (folder / "net.prototxt").write_text(net or NET.format(
        batch=4, classes=3, middle="relu", middle_type="ReLU", middle_param=""))
    (folder / name).write_text(SOLVER.format(max_iter=max_iter, extra=extra))
    return name


# --- processes ------------------------------------------------------------------------------

def descendants(pid):
    """Every process below ``pid`` now (threads' children included)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found += map(int, children)
            todo += map(int, children)
    return found


def running(pid):
    """Alive and not a zombie (an exited process that no one reaped is gone for us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def assert_all_gone(pids, within=20.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [pid for pid in pids if running(pid)]
        if not left:
            return
        time.sleep(0.2)
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left
                if running(pid)}
    raise AssertionError(f"processes left behind: {commands}")


class Run:
    """``python -m caffelayers ARGS`` in ``folder``, its stderr read as it comes."""

    def __init__(self, folder, *argv, module=("caffelayers", "train")):
        self.process = subprocess.Popen(
            [sys.executable, "-m", *module, *map(str, argv)], cwd=folder,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines, self._new = [], threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.seen = set()

    def _read(self):
        for line in self.process.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, pattern, timeout=60.0):
        """Wait for a stderr line matching ``pattern``, noting the run's processes."""
        deadline = time.monotonic() + timeout
        with self._new:
            while not any(re.search(pattern, line) for line in self.lines):
                assert self.process.poll() is None, f"the run ended:\n{self.stderr}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line matching {pattern!r}:\n{self.stderr}"
                self._new.wait(min(remaining, 0.5))
        self.seen.update(descendants(self.process.pid))

    def finish(self, timeout=90.0):
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    @property
    def stderr(self):
        return "".join(self.lines)

    def send(self, signum):
        self.seen.update(descendants(self.process.pid))
        self.process.send_signal(signum)


def snapshots(folder):
    return sorted(int(m.group(1)) for path in (folder / "snap").glob("*.solverstate")
                  if (m := re.search(r"_iter_(\d+)\.", path.name)))


# --- signals --------------------------------------------------------------------------------

def test_sigterm_stops_with_a_snapshot_and_leaves_no_process(toy):
    run = Run(toy, write_run(toy, 100000), "--workers", "2")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGTERM)
    assert run.finish() == INTERRUPTED, run.stderr
    # the tracker, the fork server and two workers at least
    assert len(run.seen) >= 4
    assert_all_gone(run.seen)
    [stopped] = snapshots(toy)
    assert 3 <= stopped < 100000
    assert "SIGTERM: stopping after this iteration" in run.stderr
    assert "Optimization stopped early." in run.stderr
    assert f"snapshot snap/run_iter_{stopped}.caffemodel" in run.stderr


def test_sighup_snapshots_and_the_run_goes_on(toy):
    run = Run(toy, write_run(toy, 300), "--workers", "1")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGHUP)
    assert run.finish() == 0, run.stderr
    taken = snapshots(toy)
    assert len(taken) == 2 and 3 <= taken[0] < 300 and taken[1] == 300, taken
    assert "SIGHUP: snapshotting after this iteration" in run.stderr
    assert "Optimization Done." in run.stderr
    assert_all_gone(run.seen)


def test_sigint_effect_none_ignores_ctrl_c(toy):
    run = Run(toy, write_run(toy, 150), "--workers", "1", "--sigint-effect", "none")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGINT)
    run.send(signal.SIGTERM)  # as SIGINT: nothing either
    assert run.finish() == 0, run.stderr
    assert snapshots(toy) == [150]
    assert "stopping" not in run.stderr


def test_sigterm_effect_of_its_own_and_a_signal_arriving_twice_at_once(toy):
    run = Run(toy, write_run(toy, 100000), "--workers", "2", "--sigterm-effect", "snapshot")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGTERM)
    run.wait_for(r"Snapshotting solver state")
    # one request delivered twice (a terminal's group and a forwarding agent): one stop
    os.kill(run.process.pid, signal.SIGINT)
    os.kill(run.process.pid, signal.SIGINT)
    assert run.finish() == INTERRUPTED, run.stderr
    assert "SIGTERM: snapshotting" in run.stderr and "Traceback" not in run.stderr
    assert "Optimization stopped early." in run.stderr
    taken = snapshots(toy)
    assert len(taken) in (1, 2) and taken[0] >= 3, taken
    assert_all_gone(run.seen)


def test_a_later_second_stop_signal_aborts(monkeypatch):
    from types import SimpleNamespace

    from caffelayers import launch
    from caffelayers.train import _Monitor

    solver = SimpleNamespace(net=SimpleNamespace(graph=SimpleNamespace(nodes=[])))
    monitor = _Monitor(solver, None, None, 1, None)
    monitor.on_signal(signal.SIGINT)
    monitor.on_signal(signal.SIGTERM)  # the same request, arriving again at once
    assert monitor.stop_requested
    monkeypatch.setattr(launch, "SAME_REQUEST_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        monitor.on_signal(signal.SIGINT)
    monitor.on_signal(signal.SIGHUP)
    assert monitor.snapshot_requested


def test_a_killed_run_leaves_no_process(toy):
    run = Run(toy, write_run(toy, 100000), "--workers", "2")
    run.wait_for(r"Iteration 3 ")
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert len(run.seen) >= 4
    assert_all_gone(run.seen)


# --- log lines, seed, net state ---------------------------------------------------------------

def logged(capsys, pattern):
    return re.findall(pattern, capsys.readouterr().err)


def test_the_logged_seed_repeats_a_run_without_random_seed(toy, capsys):
    write_run(toy, 6, extra="")
    assert run_cli("solver.prototxt", "--workers", "0") == 0
    [seed] = logged(capsys, r"Data seed (\d+) \(the solver sets no random_seed; --seed \d+ "
                            r"repeats this run\)")
    first = weights("snap/run_iter_6.caffemodel")
    (toy / "snap" / "run_iter_6.caffemodel").unlink()
    assert run_cli("solver.prototxt", "--workers", "0", "--seed", seed) == 0
    assert_same_weights(weights("snap/run_iter_6.caffemodel"), first, atol=0)
    assert run_cli("solver.prototxt", "--workers", "0", "--seed", str(int(seed) + 1)) == 0
    other = weights("snap/run_iter_6.caffemodel")
    assert not np.array_equal(other["ip1"][0], first["ip1"][0])


def test_device_resume_and_finetune_lines(toy, capsys):
    write_run(toy, 4)
    assert run_cli("solver.prototxt", "--workers", "0") == 0
    err = capsys.readouterr().err
    assert re.search(r"\] Use CPU\.$", err, re.MULTILINE) and "Data seed" not in err
    (toy / "more.prototxt").write_text(SOLVER.format(max_iter=6, extra="random_seed: 1")
                                       .replace("snap/run", "snap/more"))
    assert run_cli("more.prototxt", "--workers", "0", "--snapshot",
                   "snap/run_iter_4.solverstate") == 0
    resumed = "Resuming from snap/run_iter_4.solverstate"
    assert logged(capsys, r"\] (Resuming from .*)") == [resumed]
    assert run_cli("more.prototxt", "--workers", "0", "--weights",
                   "snap/run_iter_4.caffemodel") == 0
    finetuned = "Finetuning from snap/run_iter_4.caffemodel"
    assert logged(capsys, r"\] (Finetuning from .*)") == [finetuned]


def test_stage_and_level_set_the_train_state(toy):
    net = NET.format(batch=4, classes=3, middle="relu", middle_type="ReLU", middle_param="")
    net += ('layer { name: "staged" type: "InnerProduct" bottom: "ip1" top: "staged" '
            'include { phase: TRAIN stage: "extra" } inner_product_param { num_output: 2 } }\n'
            'layer { name: "deep" type: "InnerProduct" bottom: "ip1" top: "deep" '
            'include { phase: TRAIN min_level: 2 } inner_product_param { num_output: 2 } }\n')
    write_run(toy, 2, net=net)
    assert run_cli("solver.prototxt", "--workers", "0") == 0
    assert not {"staged", "deep"} & set(weights("snap/run_iter_2.caffemodel"))
    assert run_cli("solver.prototxt", "--workers", "0", "--stage", "extra") == 0
    layers = set(weights("snap/run_iter_2.caffemodel"))
    assert "staged" in layers and "deep" not in layers
    assert run_cli("solver.prototxt", "--workers", "0", "--stage", "a,extra",
                   "--level", "2") == 0
    assert {"staged", "deep"} <= set(weights("snap/run_iter_2.caffemodel"))


# --- workers ----------------------------------------------------------------------------------

def test_test_loaders_hold_no_workers_between_tests_and_read_on(toy):
    """18 of the 24 test items per test: each test starts where the last stopped, with
    workers started for the test and stopped after it, as the in-process reader does."""
    write_run(toy, 9, extra="random_seed: 1 test_iter: 3 test_interval: 3")
    scores, idle = {}, []

    def record(workers):
        def callback(solver):
            scores.setdefault(workers, []).append(float(solver.mean_scores[0]["accuracy"]))
            idle.append(all(loader._iterator is None
                            for loader in solver.test_inputs[0].loaders.values()))
        return callback

    for workers in (0, 1):
        train("solver.prototxt", workers=workers, callbacks=[record(workers)])
    assert all(idle)
    assert scores[1] == scores[0] and len(set(scores[0])) > 1


def test_default_workers_follow_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [loader_module.default_workers(n) for n in (1, 2, 4, 16)] == [8, 4, 2, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert loader_module.default_workers(1) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert loader_module.default_workers(1) == 1
