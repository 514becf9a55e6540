"""``caffelayers train --nproc 2 --shard-head`` against the unsharded runs.

The net: HDF5 features -> InnerProduct -> MarginInnerProduct QUADRUPLE with N = 11 classes
(shards of 6 and 5 rows; a lambda that changes every iteration) -> SoftmaxWithLoss, with an
Accuracy on the margin logits; SGD with momentum, weight decay and ``clip_gradients`` (which
clips at some iterations), a test every 3 iterations, snapshots every 3.

The command line trains it in one process with the whole batch of 8, in two unsharded
processes of 4 and in two sharded ones. Two spawned ranks then call ``train`` for the rest:
sharded runs resumed at iteration 3 from the sharded and from the unsharded snapshot, a run
whose signals ask for a snapshot and a stop, a MarginHead net (ArcFace, ``iter_size`` 2,
the loss normalized NONE) unsharded and sharded, and fine-tuning (``--weights``) unsharded and sharded.

References: the unsharded two-process run (the update must be the same) and the
one-process run, whose loss is the loss of the whole batch that the sharded run logs (an
unsharded multi-process run logs rank 0's half). The runs compute the same float32 sums in
other orders (the softmax's sums across shards, the gathered rows, DDP's average) and with
other thread counts, so blobs agree to ``rtol 1e-5`` (the logged values print 6 digits).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caffelayers import CaffeLayersError, Net
from caffelayers.net import read_weights
from caffelayers.proto import caffe_pb2, io
from caffelayers.shard_training import ShardedHeadSolver, find_sharded_head
from caffelayers.train import add_train_parser, train

h5py = pytest.importorskip("h5py")

CLASSES, FEATURES, ROWS = 11, 6, 48

NET = '''name: "sharded"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TRAIN }}
  hdf5_data_param {{ source: "h5.txt" batch_size: {batch} }} }}
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TEST }}
  hdf5_data_param {{ source: "h5.txt" batch_size: 8 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "ip1" bottom: "label" top: "fc6"
  top: "lambda" include {{ phase: TRAIN }}
  margin_inner_product_param {{ num_output: {classes} type: QUADRUPLE base: 10 gamma: 0.5
    power: 1 lambda_min: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "ip1" top: "fc6" include {{ phase: TEST }}
  inner_product_param {{ num_output: {classes} bias_term: false }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "fc6" bottom: "label" top: "accuracy" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }}
'''

SOLVER = '''net: "{net}" test_iter: 2 test_interval: 3 base_lr: 0.2 momentum: 0.9
weight_decay: 0.001 lr_policy: "fixed" display: 1 average_loss: 1 max_iter: 6 snapshot: {snapshot}
clip_gradients: {clip} snapshot_prefix: "snap/{name}" random_seed: 3
'''

DEPLOY = '''name: "deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 } }
layer { name: "fc6" type: "InnerProduct" bottom: "ip1" top: "fc6"
  inner_product_param { num_output: 11 bias_term: false } }
'''

CLIP = 1.5   # clips some iterations and not others (the logs below check both happen)


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="caffelayers")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.run(args)


def write_solver(folder, name: str, batch: int, net_text: str = NET, snapshot: int = 3,
                 clip: float = CLIP) -> str:
    (folder / f"{name}_net.prototxt").write_text(net_text.format(batch=batch, classes=CLASSES))
    (folder / f"{name}.prototxt").write_text(SOLVER.format(net=f"{name}_net.prototxt",
                                                           name=name, clip=clip,
                                                           snapshot=snapshot))
    return f"{name}.prototxt"


def write_data(folder) -> None:
    """Features that depend on the label (so that the net learns) plus noise."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, CLASSES, ROWS)
    centres = rng.normal(size=(CLASSES, FEATURES))
    data = centres[labels] + 0.5 * rng.normal(size=(ROWS, FEATURES))
    with h5py.File(folder / "train.h5", "w") as file:
        file["data"] = data.astype(np.float32)
        file["label"] = labels.astype(np.float32)
    (folder / "h5.txt").write_text("train.h5\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The command line's runs: one process, two unsharded, two sharded."""
    folder = tmp_path_factory.mktemp("shard")
    write_data(folder)
    before = os.getcwd()
    os.chdir(folder)
    try:
        common = ["--workers", "0", "--skip-data-check", "--quiet"]
        assert run_cli(write_solver(folder, "one", 8), *common, "--log", "one.log") == 0
        assert run_cli(write_solver(folder, "two", 4), *common, "--log", "two.log",
                       "--nproc", "2") == 0
        sharded = write_solver(folder, "sharded", 4)
        assert run_cli(sharded, *common, "--log", "sharded.log", "--nproc", "2",
                       "--shard-head") == 0
    finally:
        os.chdir(before)
    return folder


def blobs(path):
    return {layer: [blob.copy() for blob in values]
            for layer, values in read_weights(path).items()}


def assert_same_blobs(a, b, rtol, atol):
    assert a.keys() == b.keys() == {"ip1", "fc6"}
    for layer in a:
        assert len(a[layer]) == len(b[layer])
        for x, y in zip(a[layer], b[layer]):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=layer)


def logged(path, pattern):
    return [float(match.group(1)) for line in path.read_text().splitlines()
            if (match := re.search(pattern, line))]


LOSS = r"Iteration \d+(?: \(.*\))?, loss = ([\d.eE+-]+)"
TRAIN_ACCURACY = r"Train net output #1: accuracy = ([\d.eE+-]+)"
TEST_ACCURACY = r"Test net output #0: accuracy = ([\d.eE+-]+)"


def test_sharded_run_updates_as_the_unsharded_runs(runs):
    sharded = blobs(runs / "snap/sharded_iter_6.caffemodel")
    assert_same_blobs(sharded, blobs(runs / "snap/two_iter_6.caffemodel"), 1e-5, 1e-6)
    assert_same_blobs(sharded, blobs(runs / "snap/one_iter_6.caffemodel"), 1e-5, 1e-6)
    first = blobs(runs / "snap/sharded_iter_3.caffemodel")
    assert not np.allclose(first["fc6"][0], sharded["fc6"][0], atol=1e-3)   # it learned


def test_sharded_run_logs_the_loss_of_the_whole_batch(runs):
    log, whole = runs / "sharded.log", runs / "one.log"
    losses = logged(log, LOSS)
    assert len(losses) == 7   # iterations 0 to 5 and solve's final forward at 6
    np.testing.assert_allclose(losses, logged(whole, LOSS), rtol=1e-5)
    np.testing.assert_allclose(logged(log, TRAIN_ACCURACY), logged(whole, TRAIN_ACCURACY),
                               rtol=1e-5)
    tests = logged(log, TEST_ACCURACY)
    assert len(tests) == 3 and tests == logged(runs / "two.log", TEST_ACCURACY)
    clipped = [line for line in log.read_text().splitlines() if "Gradient clipping" in line]
    assert 0 < len(clipped) < 6
    assert len(clipped) == log.read_text().count("Gradient clipping") == \
        (runs / "two.log").read_text().count("Gradient clipping")
    assert "11 classes split over 2 processes" in log.read_text()
    # unsharded, rank 0 logs the loss of its own half of the batch
    assert not np.allclose(logged(runs / "two.log", LOSS), losses, rtol=1e-5)


def test_sharded_snapshot_is_a_standard_caffe_snapshot(runs):
    from caffelayers.cli import main

    model = runs / "snap/sharded_iter_6.caffemodel"
    state = caffe_pb2.SolverState.FromString((runs / "snap/sharded_iter_6.solverstate")
                                             .read_bytes())
    assert state.iter == 6 and state.learned_net.endswith("sharded_iter_6.caffemodel")
    assert [tuple(io.blob_to_array(blob).shape) for blob in state.history] == \
        [(5, FEATURES), (5,), (CLASSES, 5)]
    reference = caffe_pb2.SolverState.FromString((runs / "snap/two_iter_6.solverstate")
                                                 .read_bytes())
    for ours, theirs in zip(state.history, reference.history):
        np.testing.assert_allclose(io.blob_to_array(ours), io.blob_to_array(theirs),
                                   rtol=1e-5, atol=1e-6)
    trained = caffe_pb2.NetParameter.FromString(model.read_bytes())
    assert [(layer.name, layer.type) for layer in trained.layer if layer.blobs] == \
        [("ip1", "InnerProduct"), ("fc6", "MarginInnerProduct")]
    net = Net(runs / "sharded_net.prototxt", weights=model, phase="TRAIN")
    np.testing.assert_array_equal(net.layer("fc6").weight.detach().numpy(),
                                  blobs(model)["fc6"][0])
    (runs / "deploy.prototxt").write_text(DEPLOY)
    assert main(["convert", str(runs / "deploy.prototxt"), str(model), "--to", "onnx",
                 "-o", str(runs / "deploy.onnx")]) == 0
    assert (runs / "deploy.onnx").stat().st_size > 0
    counters = json.loads((runs / "snap/sharded_iter_6.caffelayers.json").read_text())
    assert counters["nets"]["train"] == {"fc6": {"iteration": 6}}


# -- signals and MarginHead, in spawned ranks ----------------------------------------------------

ARC_HEAD = (
    'layer {{ name: "fc6" type: "MarginHead" bottom: "ip1" bottom: "label" top: "fc6" '
    'include {{ phase: TRAIN }} margin_head_param {{ num_output: {classes} kind: ARC '
    'scale: 8 margin: 0.3 }} }}\n')


def _full_head_tensors(solver) -> int:
    """How many tensors of the head's full size the solver keeps between steps: in the
    nets' parameters and buffers (train and test) and in the history."""
    tensors = [*solver.history]
    for net in [solver.net, *solver.test_nets]:
        tensors += [*net.parameters(), *net.buffers()]
    return sum(tuple(tensor.shape) == (CLASSES, 5) for tensor in tensors)


def _rank_main(rank: int, world: int, store: str, folder: str) -> None:
    """Rank ``rank``: a sharded run that SIGHUP snapshots at iteration 3 and SIGINT stops at
    5 (each signal on one rank only: the ranks agree on it at the next iteration, 4, and act
    after its update, as Caffe does; every rank must join the gather),
    sharded runs resumed at iteration 3 from the sharded and the unsharded snapshot, a
    MarginHead net unsharded and sharded, and fine-tuning unsharded and sharded."""
    os.chdir(folder)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))

    def signal_at(solver):
        if (rank, solver.iter) in ((0, 1), (1, 3)):
            os.kill(os.getpid(), signal.SIGHUP if rank == 0 else signal.SIGINT)

    try:
        options = {"rank": rank, "world": world, "workers": 0, "data_check": False}
        result = train("signals.prototxt", shard_head=True, callbacks=[signal_at], **options)
        outcome = [result.interrupted, result.solver.iter, result.snapshot,
                   _full_head_tensors(result.solver)]
        for name, start in (("own", "sharded"), ("plain", "two")):
            train(f"{name}.prototxt", shard_head=True,
                  snapshot=f"snap/{start}_iter_3.solverstate", **options)
        for name, shard in (("arc_plain", False), ("arc_sharded", True)):
            train(f"{name}.prototxt", shard_head=shard, **options)
        for name, shard in (("tuned_plain", False), ("tuned_sharded", True)):
            train(f"{name}.prototxt", shard_head=shard, weights="snap/two_iter_6.caffemodel",
                  **options)
        for name in ("sampled_a", "sampled_b"):
            train(f"{name}.prototxt", shard_head=True, shard_sample_rate=0.5, **options)
        Path(f"rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(runs):
    """The runs of :func:`_rank_main` in the runs' folder."""
    write_solver(runs, "signals", 4, snapshot=0)
    for name in ("own", "plain", "tuned_plain", "tuned_sharded", "sampled_a", "sampled_b"):
        write_solver(runs, name, 4)
    arc = NET.split('layer {{ name: "fc6" type: "MarginInnerProduct"')[0] + ARC_HEAD + \
        NET.split("lambda_min: 1 weight_filler {{ type: \"xavier\" }} }} }}\n")[1]
    arc = arc.replace('top: "loss" }}', 'top: "loss" loss_param {{ normalization: NONE }} }}')
    for name in ("arc_plain", "arc_sharded"):
        # no clipping, which would hide a gradient off by a constant factor
        solver = runs / write_solver(runs, name, 4, arc, clip=-1)
        solver.write_text(solver.read_text() + "iter_size: 2\n")
    mp.spawn(_rank_main, args=(2, str(runs / "store"), str(runs)), nprocs=2)
    return runs


def test_signals_snapshot_collectively(spawned):
    ranks = [json.loads((spawned / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    paths = ["snap/signals_iter_5.caffemodel", "snap/signals_iter_5.solverstate"]
    # rank 0 alone writes; no rank keeps the full head (the test net's is lent at a test)
    assert ranks == [[True, 5, paths, 0], [True, 5, None, 0]]
    # the snapshot SIGHUP asked for holds the state of the scheduled one at iteration 3
    assert_same_blobs(blobs(spawned / "snap/signals_iter_3.caffemodel"),
                      blobs(spawned / "snap/sharded_iter_3.caffemodel"), 1e-6, 1e-7)
    assert (spawned / paths[0]).is_file() and (spawned / paths[1]).is_file()


@pytest.mark.parametrize("start", ["own", "plain"])
def test_sharded_run_resumes_from_either_snapshot(spawned, start):
    assert_same_blobs(blobs(spawned / f"snap/{start}_iter_6.caffemodel"),
                      blobs(spawned / "snap/sharded_iter_6.caffemodel"), 1e-5, 1e-6)


def test_margin_head_net_with_iter_size_and_a_summed_loss_shards_too(spawned):
    assert_same_blobs(blobs(spawned / "snap/arc_sharded_iter_6.caffemodel"),
                      blobs(spawned / "snap/arc_plain_iter_6.caffemodel"), 1e-5, 1e-6)


def test_fine_tuning_shards_the_loaded_weights(spawned):
    tuned = blobs(spawned / "snap/tuned_sharded_iter_6.caffemodel")
    assert_same_blobs(tuned, blobs(spawned / "snap/tuned_plain_iter_6.caffemodel"), 1e-5, 1e-6)
    assert not np.allclose(tuned["fc6"][0], blobs(spawned / "snap/sharded_iter_6.caffemodel")
                           ["fc6"][0], atol=1e-3)   # it started from the loaded weights


def test_class_sampling_trains_repeatably_and_differs_from_every_class(spawned):
    first = blobs(spawned / "snap/sampled_a_iter_6.caffemodel")
    assert_same_blobs(first, blobs(spawned / "snap/sampled_b_iter_6.caffemodel"), 0, 0)
    every = blobs(spawned / "snap/sharded_iter_6.caffemodel")
    assert not np.allclose(first["fc6"][0], every["fc6"][0], atol=1e-4)
    assert not np.allclose(first["fc6"][0], blobs(spawned / "snap/sampled_a_iter_3.caffemodel")
                           ["fc6"][0], atol=1e-3)   # it learned


# -- errors --------------------------------------------------------------------------------------

def test_shard_head_needs_two_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    with pytest.raises(CaffeLayersError, match=r"--shard-head .* needs --nproc 2 or more"):
        run_cli(write_solver(tmp_path, "one", 8), "--shard-head", "--workers", "0")


def test_the_class_sampling_rate_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    solver = write_solver(tmp_path, "one", 8)
    with pytest.raises(CaffeLayersError, match="give --shard-head with it"):
        run_cli(solver, "--shard-sample-rate", "0.5", "--nproc", "2")
    for rate in ("0", "1.5", "nan", "half"):
        with pytest.raises(SystemExit):
            run_cli(solver, "--shard-head", "--nproc", "2", "--shard-sample-rate", rate)
        assert f"a class sampling rate lies in (0, 1], got '{rate}'" in capsys.readouterr().err
    with pytest.raises(CaffeLayersError, match="give --shard-head with it"):
        train(solver, shard_sample_rate=0.5)


def _net(tmp_path, text: str) -> Net:
    (tmp_path / "net.prototxt").write_text(text)
    return Net(tmp_path / "net.prototxt", phase="TRAIN")


BASE = '''name: "bad"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
'''
HEAD = '''layer { name: "fc6" type: "MarginInnerProduct" bottom: "data" bottom: "label"
  top: "fc6" margin_inner_product_param { num_output: 11 type: DOUBLE } }
'''
LOSS_LAYER = '''layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label"
  top: "loss" }
'''


@pytest.mark.parametrize("body, message", [
    ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "fc6" '
     'inner_product_param { num_output: 11 } }\n' + LOSS_LAYER,
     (r"net.prototxt: --shard-head .* needs exactly one MarginInnerProduct or MarginHead "
      r"layer in it; found none")),
    (HEAD + LOSS_LAYER + 'layer { name: "l2" type: "EuclideanLoss" bottom: "fc6" '
     'bottom: "fc6" top: "l2" }\n',
     (r"its top 'fc6', so that top must feed exactly one SoftmaxWithLoss .*; it feeds "
      r"'loss' \(SoftmaxWithLoss\), 'l2' \(EuclideanLoss\)")),
    (HEAD + LOSS_LAYER + 'layer { name: "top5" type: "Accuracy" bottom: "fc6" '
     'bottom: "label" top: "top5" accuracy_param { top_k: 5 } }\n',
     r"layer 'top5' \(Accuracy\) reads 'fc6'.*top_k 1"),
    (HEAD + LOSS_LAYER.replace('top: "loss"', 'top: "loss" top: "prob"'),
     r"layer 'loss' \(SoftmaxWithLoss\) cannot be fused with 'fc6' .*one top"),
])
def test_unsplittable_nets_are_refused_naming_the_layers(tmp_path, body, message):
    with pytest.raises(CaffeLayersError, match=message):
        find_sharded_head(_net(tmp_path, BASE + body))


def test_the_solver_checks_the_net_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    plain = NET.split('layer {{ name: "fc6"')[0] + (
        'layer {{ name: "fc6" type: "InnerProduct" bottom: "ip1" top: "fc6" '
        'inner_product_param {{ num_output: {classes} }} }}\n'
        'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" '
        'top: "loss" }}\n')
    solver = write_solver(tmp_path, "plain", 4, plain)
    with pytest.raises(CaffeLayersError, match=r"plain_net.prototxt: --shard-head"):
        ShardedHeadSolver(solver)
    with pytest.raises(CaffeLayersError, match=r"plain_net.prototxt: --shard-head"):
        train(solver, shard_head=True, world=2, workers=0)
