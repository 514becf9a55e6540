"""``caffelayers train``: a real image list on disk, Caffe's log, snapshots on Ctrl-C and at
the end, resuming, the non-finite loss check and two gloo processes against one."""

import argparse
import datetime
import os
import re
import signal

import numpy as np
import pytest
import torch

from caffelayers import CaffeLayersError
from caffelayers.net import read_weights
from caffelayers.train import (INTERRUPTED, NonFiniteLossError, _layers_off_the_loss,
                               add_train_parser, train)
from caffelayers.train_log import GlogFormatter

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")

CLASSES = 3

NET = '''name: "toy"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.01 mean_value: 128 mirror: true crop_size: 6 }}
  image_data_param {{ source: "train.txt" batch_size: {batch} shuffle: true is_color: false
    new_height: 8 new_width: 7 }} }}
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.01 mean_value: 128 crop_size: 6 }}
  image_data_param {{ source: "train.txt" batch_size: 6 is_color: false new_height: 8
    new_width: 7 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "{middle}" type: "{middle_type}" bottom: "ip1" top: "ip1" {middle_param} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "ip1" bottom: "label" top: "fc6"
  top: "lambda" include {{ phase: TRAIN }}
  margin_inner_product_param {{ num_output: {classes} type: DOUBLE base: 10 gamma: 0.5
    power: 1 lambda_min: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "ip1" top: "fc6" include {{ phase: TEST }}
  inner_product_param {{ num_output: {classes} bias_term: false }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "fc6" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }}
'''

SOLVER = '''net: "{net}"
test_iter: 4 test_interval: 10 base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005
lr_policy: "step" gamma: 0.5 stepsize: 10 display: 5 max_iter: {max_iter} snapshot: 10
snapshot_prefix: "{prefix}" random_seed: 1
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """24 grayscale 10x9 images of 3 brightness classes; the working directory is theirs."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(24):
        label = i % CLASSES
        image = rng.normal(60 + 60 * label, 20, (10, 9)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), image)
        lines.append(f"img/{i}.png {label}\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_solver(folder, name="solver", batch=4, max_iter=20, prefix="snap/toy",
                 middle=("relu", "ReLU", ""), classes=CLASSES):
    net = f"{name}_net.prototxt"
    (folder / net).write_text(NET.format(batch=batch, classes=classes, middle=middle[0],
                                         middle_type=middle[1], middle_param=middle[2]))
    (folder / f"{name}.prototxt").write_text(SOLVER.format(net=net, max_iter=max_iter,
                                                           prefix=prefix))
    return f"{name}.prototxt"


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="caffelayers")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.run(args)


def weights(path):
    return {layer: [b.copy() for b in blobs] for layer, blobs in read_weights(path).items()}


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for layer in a:
        for x, y in zip(a[layer], b[layer]):
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=layer)


def glog_time(line):
    """What Caffe's extract_seconds.py reads from a line: month, day, time, microseconds."""
    fields = line.split()
    clock, _, micro = fields[1].rpartition(".")
    hour, minute, second = map(int, clock.split(":"))
    return datetime.datetime(2000, int(fields[0][1:3]), int(fields[0][3:5]), hour, minute,
                             second, int(micro))


def test_train_logs_as_caffe_and_snapshots(toy, capsys):
    assert run_cli(write_solver(toy), "--workers", "1") == 0
    lines = capsys.readouterr().err.splitlines()
    assert any("Solving toy" in line for line in lines)
    first = next(i for i, line in enumerate(lines) if re.search(r"Iteration \d+", line))
    times = [glog_time(line) for line in lines[first:]]  # every line parses, as in parse_log
    assert times == sorted(times)
    train_loss = [float(m.group(2)) for line in lines
                  if (m := re.search(r"Iteration (\d+) \(.*\), loss = ([\d.eE+-]+)", line))]
    rates = [float(m.group(1)) for line in lines if (m := re.search(r"lr = ([\d.eE+-]+)", line))]
    accuracy = [float(m.group(1)) for line in lines
                if (m := re.search(r"Test net output #0: accuracy = ([\d.eE+-]+)", line))]
    assert len(train_loss) == 4 and rates[:2] == [0.05, 0.05] and rates[-1] == 0.025
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0]
    for iteration in (10, 20):
        for suffix in ("caffemodel", "solverstate"):
            assert (toy / "snap" / f"toy_iter_{iteration}.{suffix}").is_file()


def test_resumed_run_continues_the_data_and_the_update(toy):
    assert run_cli(write_solver(toy)) == 0
    resumed = write_solver(toy, name="resumed", prefix="snap/resumed")
    assert run_cli(resumed, "--snapshot", "snap/toy_iter_10.solverstate",
                   "--workers", "0") == 0
    assert_same_weights(weights("snap/resumed_iter_20.caffemodel"),
                        weights("snap/toy_iter_20.caffemodel"), atol=1e-7)


def test_ctrl_c_stops_at_the_iteration_boundary_with_a_snapshot(toy):
    def interrupt(solver):
        if solver.iter == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = train(write_solver(toy), workers=0, callbacks=[interrupt])
    assert result.interrupted and result.solver.iter == 3
    assert result.snapshot == ("snap/toy_iter_3.caffemodel", "snap/toy_iter_3.solverstate")
    assert (toy / "snap" / "toy_iter_3.solverstate").is_file()
    assert signal.getsignal(signal.SIGINT) is before
    assert INTERRUPTED == 130


def test_non_finite_loss_names_the_first_layer(toy):
    # sqrt of the InnerProduct's negative outputs: the first non-finite top is the Power's.
    solver = write_solver(toy, middle=("sqrt", "Power", "power_param { power: 0.5 }"))
    with pytest.raises(NonFiniteLossError, match=r"the loss became nan at iteration 0: layer "
                       r"'sqrt' \(Power\) is the first whose output is non-finite") as caught:
        run_cli(solver, "--workers", "0")
    assert caught.value.layer == "sqrt" and caught.value.iteration == 0


def test_label_outside_the_classes_names_the_line(toy):
    with pytest.raises(CaffeLayersError, match=r"train.txt:3: .*label 2 is outside the "
                       r"classes: layer 'fc6' \(MarginInnerProduct\) accepts \[0, 2\)"):
        run_cli(write_solver(toy, classes=2), "--workers", "0")


def test_bad_invocations(toy):
    solver = write_solver(toy)
    with pytest.raises(CaffeLayersError, match="not both"):
        run_cli(solver, "--weights", "a.caffemodel", "--snapshot", "a.solverstate")
    with pytest.raises(CaffeLayersError, match="--nproc must be at least 1"):
        run_cli(solver, "--nproc", "0")
    if not torch.cuda.is_available():
        with pytest.raises(CaffeLayersError, match="CUDA is not available"):
            run_cli(solver, "--device", "cuda")


def test_two_gloo_processes_match_one_with_twice_the_batch(toy):
    """Each process reads every other item of the stream and DDP averages the gradients:
    the weights equal one process's with the whole batch (random crops and mirrors too)."""
    assert run_cli(write_solver(toy, name="one", batch=4, max_iter=6, prefix="snap/one"),
                   "--workers", "0") == 0
    assert run_cli(write_solver(toy, name="two", batch=2, max_iter=6, prefix="snap/two"),
                   "--workers", "0", "--nproc", "2") == 0
    assert_same_weights(weights("snap/two_iter_6.caffemodel"),
                        weights("snap/one_iter_6.caffemodel"), atol=1e-6)


def test_only_layers_cut_off_from_the_loss_are_reported(toy):
    from caffelayers import Net

    text = (toy / write_solver(toy).replace(".prototxt", "_net.prototxt")).read_text()
    text += ('layer { name: "side" type: "InnerProduct" bottom: "ip1" top: "side" '
             'inner_product_param { num_output: 2 } }\n'
             'layer { name: "blocked" type: "InnerProduct" bottom: "data" top: "blocked" '
             f'inner_product_param {{ num_output: {CLASSES} }} }}\n'
             'layer { name: "add" type: "Eltwise" bottom: "blocked" bottom: "fc6" top: "sum" '
             'propagate_down: false propagate_down: true }\n'
             'layer { name: "l2" type: "EuclideanLoss" bottom: "sum" bottom: "fc6" top: "l2" '
             'include { phase: TRAIN } }\n')
    (toy / "net.prototxt").write_text(text)
    net = Net(toy / "net.prototxt", phase="TRAIN")
    assert _layers_off_the_loss(net.graph) == ["blocked", "side"]


def test_log_format():
    # The progress bar's tests are in tests/test_train_output.py.
    import logging

    record = logging.LogRecord("caffelayers.solver", logging.INFO, "/x/solver.py", 228,
                               "Iteration %d, loss = %g", (100, 2.5), None)
    line = GlogFormatter().format(record)
    assert re.fullmatch(r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.py:228\] Iteration 100, "
                        r"loss = 2\.5", line)


def test_memory_data_and_input_layers_train_from_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text('''name: "arrays"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
''')
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 '
                                              'lr_policy: "fixed" max_iter: 4 '
                                              'snapshot_prefix: "s" random_seed: 0')
    data = np.random.default_rng(0).normal(size=(4, 1, 2, 3)).astype(np.float32)
    result = train("solver.prototxt", arrays={"data": data, "label": np.array([0, 1, 1, 0])})
    assert result.solver.iter == 4 and (tmp_path / "s_iter_4.caffemodel").is_file()
    with pytest.raises(CaffeLayersError, match=r"layer 'data' \(MemoryData\) is fed from "
                       r"arrays: give arrays for 'data', 'label'"):
        run_cli("solver.prototxt")
