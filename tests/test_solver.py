"""caffelayers.Solver: Caffe's update rules, learning-rate policies, regularization, clipping,
iter_size, tests, display, snapshots and resume, and the sphereface20_mini_train parity case.

The reference below is written from Caffe's formulas in numpy float64, independently of the
solver's torch code; the tiny net (InnerProduct + EuclideanLoss) has the gradient
``dW = d^T x, db = sum(d)`` with ``d = (x W^T + b - t) / N``.
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import caffelayers
from caffelayers import CaffeFormatError, CaffeLayersError, UnsupportedParameterError
from caffelayers.proto import caffe_pb2, io
from caffelayers.solver import LR_POLICIES, SOLVER_TYPES, Solver, caffe_learning_rate
from caffelayers.verify import verify_solver_case

N, K, M = 3, 5, 4   # batch, inputs, outputs: distinct sizes
TINY_NET = f'''name: "tiny"
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {N} dim: {K} }} }} }}
layer {{ name: "t" type: "Input" top: "t" input_param {{ shape {{ dim: {N} dim: {M} }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: {M} weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "uniform" min: -1 max: 1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }}
'''


def f32(value):
    """A solver.prototxt float as Caffe (and our parser) holds it."""
    return float(np.float32(value))


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(N, K)), "t": rng.normal(size=(N, M))} for _ in range(count)]


def tiny_solver(tmp_path, settings, inputs, dtype=torch.float64, net=TINY_NET, **kwargs):
    (tmp_path / "net.prototxt").write_text(net)
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "net.prototxt"\nrandom_seed: 3\n' + settings)
    return Solver(path, inputs=inputs, dtype=dtype, root=tmp_path, **kwargs)


def gradients(weight, bias, batch):
    d = (batch["x"] @ weight.T + bias - batch["t"]) / N
    return [d.T @ batch["x"], d.sum(axis=0)]


def reference(kind, hyper, start, data, rate, steps, iter_size=1, clip=-1.0, l1=False):
    """Caffe's SGDSolver family in numpy: clip, normalize, regularize, update, w -= update."""
    params = [p.copy() for p in start]
    lr_mult, decay_mult = [1.0, 2.0], [1.0, 0.0]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    m, delta = hyper.get("momentum", 0.0), hyper.get("delta", f32(1e-8))
    feed = iter(data)
    for it in range(steps):
        grads = [np.zeros_like(p) for p in params]
        for _ in range(iter_size):
            grads = [a + b for a, b in zip(grads, gradients(*params, next(feed)))]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        if 0 <= clip < norm:
            grads = [g * clip / norm for g in grads]
        for i, p in enumerate(params):
            g = grads[i] / iter_size
            g = g + hyper.get("weight_decay", 0.0) * decay_mult[i] * (np.sign(p) if l1 else p)
            r = rate(it) * lr_mult[i]
            if kind == "SGD":
                first[i] = m * first[i] + r * g
                update = first[i]
            elif kind == "Nesterov":
                old = first[i]
                first[i] = m * first[i] + r * g
                update = (1 + m) * first[i] - m * old
            elif kind == "AdaGrad":
                first[i] = first[i] + g ** 2
                update = r * g / (np.sqrt(first[i]) + delta)
            elif kind == "RMSProp":
                decay = hyper["rms_decay"]
                first[i] = decay * first[i] + (1 - decay) * g ** 2
                update = r * g / (np.sqrt(first[i]) + delta)
            elif kind == "AdaDelta":
                first[i] = m * first[i] + (1 - m) * g ** 2
                step = g * np.sqrt((second[i] + delta) / (first[i] + delta))
                second[i] = m * second[i] + (1 - m) * step ** 2
                update = r * step
            else:  # Adam
                b1, b2, t = m, hyper["momentum2"], it + 1
                first[i] = b1 * first[i] + (1 - b1) * g
                second[i] = b2 * second[i] + (1 - b2) * g ** 2
                update = (r * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * first[i]
                          / (np.sqrt(second[i]) + delta))
            params[i] = p - update
    return params, first, second


def start_params(solver):
    return [p.detach().double().numpy().copy() for p in solver.net.layer("ip").caffe_blobs()]


def final_params(solver):
    return [p.detach().double().numpy() for p in solver.net.layer("ip").caffe_blobs()]


# --- fixture parity -----------------------------------------------------------------------------

def test_sphereface20_mini_train_matches_caffe_at_every_step(cases_dir):
    result = verify_solver_case(cases_dir / "sphereface20_mini_train")
    assert result.passed, "\n".join([c.describe() for c in result.failures] + [result.summary])
    keys = [check.key for check in result.checks]
    for index in range(5):  # every step: parameters after the update and the update itself
        assert f"iter{index}/param_after/fc6/0" in keys and f"iter{index}/update/fc5/0" in keys


# --- update rules and learning rates ----------------------------------------------------------

RULES = {
    "SGD": ("momentum: 0.9", {"momentum": f32(0.9)}),
    "Nesterov": ("momentum: 0.8", {"momentum": f32(0.8)}),
    "AdaGrad": ("delta: 0.001", {"delta": f32(1e-3)}),
    "RMSProp": ("rms_decay: 0.7 delta: 0.01", {"rms_decay": f32(0.7), "delta": f32(0.01)}),
    "AdaDelta": ("momentum: 0.95 delta: 0.000001", {"momentum": f32(0.95), "delta": f32(1e-6)}),
    "Adam": ("momentum: 0.9 momentum2: 0.99", {"momentum": f32(0.9), "momentum2": f32(0.99)}),
}


@pytest.mark.parametrize("kind", list(SOLVER_TYPES))
def test_update_rule_follows_caffe_formula(tmp_path, kind):
    settings, hyper = RULES[kind]
    hyper["weight_decay"] = f32(0.01)
    data = batches(4, seed=1)
    solver = tiny_solver(tmp_path, f'type: "{kind}" {settings} weight_decay: 0.01 base_lr: 0.1 '
                         'lr_policy: "multistep" gamma: 0.5 stepvalue: 2', data)
    start = start_params(solver)
    solver.step(4)

    def rate(it):
        return f32(0.1) * f32(0.5) ** (it >= 2)
    params, first, second = reference(kind, hyper, start, data, rate, 4)
    for ours, expected in zip(final_params(solver), params):
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    # The history is Caffe's: slot 0 of every blob, then slot 1 (AdaDelta, Adam).
    expected_history = first + (second if SOLVER_TYPES[kind].history_slots == 2 else [])
    assert len(solver.history) == len(expected_history)
    for ours, expected in zip(solver.history, expected_history):
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_sgd_history_keeps_lr_times_grad_across_a_rate_step(tmp_path):
    # Caffe: h1 = m lr0 g0 + lr1 g1. torch.optim.SGD would give lr1 (m g0 + g1).
    data = batches(2, seed=2)
    solver = tiny_solver(tmp_path, 'momentum: 0.9 base_lr: 1 lr_policy: "step" stepsize: 1 '
                         'gamma: 0.1', data)
    w0, b0 = start_params(solver)
    g0 = gradients(w0, b0, data[0])[0]
    solver.step(1)
    w1 = final_params(solver)[0]
    g1 = gradients(w1, final_params(solver)[1], data[1])[0]
    solver.step(1)
    update = solver.net.layer("ip").weight.grad.numpy()
    np.testing.assert_allclose(update, f32(0.9) * g0 + f32(0.1) * g1, rtol=1e-6)
    assert not np.allclose(update, f32(0.1) * (f32(0.9) * g0 + g1), rtol=1e-3)


POLICY_SETTINGS = {
    "fixed": ("", lambda it: 0.2),
    "step": ("stepsize: 3 gamma: 0.5", lambda it: 0.2 * 0.5 ** (it // 3)),
    "exp": ("gamma: 0.9", lambda it: 0.2 * 0.9 ** it),
    "inv": ("gamma: 0.1 power: 0.75", lambda it: 0.2 * (1 + 0.1 * it) ** -0.75),
    "multistep": ("gamma: 0.1 stepvalue: 2 stepvalue: 5 stepvalue: 6",
                  lambda it: 0.2 * 0.1 ** sum(it >= s for s in (2, 5, 6))),
    "poly": ("power: 2 max_iter: 10", lambda it: 0.2 * (1 - it / 10) ** 2),
    "sigmoid": ("gamma: 0.5 stepsize: 4", lambda it: 0.2 / (1 + math.exp(-0.5 * (it - 4)))),
}


@pytest.mark.parametrize("policy", LR_POLICIES)
def test_learning_rate_policy(policy):
    settings, formula = POLICY_SETTINGS[policy]
    param = io.parse_solver(f'base_lr: 0.2 lr_policy: "{policy}" {settings}')
    step = 0
    for it in range(10):
        rate, step = caffe_learning_rate(param, it, step)
        assert rate == pytest.approx(formula(it), rel=1e-6), it


def test_multistep_advances_one_step_per_call_and_the_solver_uses_the_rates(tmp_path):
    param = io.parse_solver('base_lr: 1 lr_policy: "multistep" gamma: 0.1 stepvalue: 1 '
                            'stepvalue: 2')
    # Resumed at iteration 5 with the counter lost, Caffe climbs one step per iteration.
    assert [caffe_learning_rate(param, 5, s)[1] for s in (0, 1, 2)] == [1, 2, 2]
    solver = tiny_solver(tmp_path, 'base_lr: 0.2 lr_policy: "exp" gamma: 0.5', batches(1) * 3)
    rates = []
    solver.on_gradients_ready.append(lambda s: rates.append(s.iter))
    solver.step(3)
    assert rates == [0, 1, 2] and solver.learning_rate == pytest.approx(0.2 * 0.25, rel=1e-6)


# --- regularization, clipping, iter_size -------------------------------------------------------

def test_l1_regularization_adds_decay_times_sign(tmp_path):
    data = batches(3, seed=3)
    solver = tiny_solver(tmp_path, 'base_lr: 0.05 lr_policy: "fixed" momentum: 0.5 '
                         'weight_decay: 0.2 regularization_type: "L1"', data)
    start = start_params(solver)
    solver.step(3)
    hyper = {"momentum": f32(0.5), "weight_decay": f32(0.2)}
    params, _, _ = reference("SGD", hyper, start, data, lambda it: f32(0.05), 3, l1=True)
    for ours, expected in zip(final_params(solver), params):
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    l2, _, _ = reference("SGD", hyper, start, data, lambda it: f32(0.05), 3)
    assert not np.allclose(final_params(solver)[0], l2[0])


def test_clip_gradients_scales_the_global_norm_before_iter_size_division(tmp_path):
    data = batches(4, seed=4)
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" clip_gradients: 0.05 '
                         'iter_size: 2', data)
    start = start_params(solver)
    norms = []
    solver.on_gradients_ready.append(lambda s: norms.append(math.sqrt(sum(
        float((p.grad ** 2).sum()) for p in s.net.layer("ip").caffe_blobs()))))
    solver.step(2)
    assert min(norms) > 0.05  # the clip was active
    params, _, _ = reference("SGD", {}, start, data, lambda it: f32(0.1), 2, iter_size=2,
                             clip=f32(0.05))
    for ours, expected in zip(final_params(solver), params):
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_iter_size_accumulates_gradients_and_averages_the_loss(tmp_path):
    data = batches(6, seed=5)
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                         'weight_decay: 0.001 iter_size: 3', data)
    start = start_params(solver)
    loss = solver.step(1)
    expected_loss = np.mean([((b["x"] @ start[0].T + start[1] - b["t"]) ** 2).sum() / (2 * N)
                             for b in data[:3]])
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    solver.step(1)
    hyper = {"momentum": f32(0.9), "weight_decay": f32(0.001)}
    params, _, _ = reference("SGD", hyper, start, data, lambda it: f32(0.1), 2, iter_size=3)
    for ours, expected in zip(final_params(solver), params):
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_update_is_left_in_grad_and_lr_mult_zero_blobs_stay(tmp_path):
    net = TINY_NET.replace("param { lr_mult: 2 decay_mult: 0 }",
                           "param { lr_mult: 0 decay_mult: 1 }")
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                         'weight_decay: 0.5', batches(1)[0], net=net)
    weight, bias = (p.detach().clone() for p in solver.net.layer("ip").caffe_blobs())
    solver.step(2)
    layer = solver.net.layer("ip")
    assert torch.equal(layer.bias, bias) and not torch.equal(layer.weight, weight)
    assert torch.count_nonzero(layer.bias.grad) == 0 and torch.count_nonzero(layer.weight.grad)


# --- display and tests ---------------------------------------------------------------------------

def test_display_logs_the_loss_averaged_over_average_loss(tmp_path, caplog):
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" display: 1 '
                         'average_loss: 2', batches(4, seed=6))
    losses = []
    solver.on_gradients_ready.append(lambda s: losses.append(s.net.loss().item()))
    with caplog.at_level(logging.INFO, logger="caffelayers.solver"):
        smoothed = solver.step(3)
    assert smoothed == pytest.approx((losses[1] + losses[2]) / 2, rel=1e-12)
    text = caplog.text
    assert "Iteration 2 (" in text and f"loss = {smoothed:.6g}" in text
    assert "Train net output #0: loss = " in text and "(* 1 = " in text
    assert "Iteration 2, lr = 0.1" in text


def test_test_nets_share_weights_and_average_outputs(tmp_path):
    test_data = batches(5, seed=7)
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" test_iter: 2 '
                         'test_interval: 2 test_initialization: false', batches(3, seed=8),
                         test_inputs=iter(test_data))
    assert len(solver.test_nets) == 1 and solver.test_nets[0].phase == "TEST"
    seen = {}
    solver.on_start.append(lambda s: seen.setdefault(s.iter, start_params(s)))
    solver.step(3)  # tests before iteration 2 only (not at 0: test_initialization false)
    weight, bias = seen[2]
    expected = np.mean([((b["x"] @ weight.T + bias - b["t"]) ** 2).sum() / (2 * N)
                        for b in test_data[:2]])
    assert solver.mean_scores[0]["loss"] == pytest.approx(expected, rel=1e-12)
    assert solver.test(0)["loss"] != pytest.approx(expected)  # next batches, new weights


def test_inline_train_and_test_nets_with_states(tmp_path):
    net = io.parse_prototxt(TINY_NET + 'layer { name: "extra" type: "EuclideanLoss" '
                            'bottom: "y" bottom: "t" top: "extra" loss_weight: 2 '
                            'include { stage: "more" } }\n')
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", test_interval=5)
    param.train_net_param.CopyFrom(net)
    param.test_net_param.add().CopyFrom(net)
    param.test_iter.append(1)
    param.train_state.stage.append("more")
    solver = Solver(param, inputs=batches(1)[0], test_inputs=[batches(1)[0]])
    assert [n.name for n in solver.net.graph.nodes][-1] == "extra"
    assert "extra" not in [n.name for n in solver.test_nets[0].graph.nodes]
    assert solver.step(1) > 0


def test_inputs_that_run_out_or_are_missing_raise(tmp_path):
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"', batches(1))
    solver.step(1)
    with pytest.raises(CaffeLayersError, match="ran out of batches after 1"):
        solver.step(1)
    solver.inputs = None
    with pytest.raises(CaffeLayersError, match="reads the inputs x, t"):
        solver.step(1)


# --- snapshots and resume ------------------------------------------------------------------------

MIP_NET = '''name: "head"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "fc5" type: "InnerProduct" bottom: "data" top: "fc5"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6"
  top: "lambda" margin_inner_product_param { num_output: 7 type: QUADRUPLE
  weight_filler { type: "xavier" } base: 1000 gamma: 0.12 power: 1 lambda_min: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }
'''
MIP_SOLVER = ('base_lr: 0.1 lr_policy: "multistep" gamma: 0.1 stepvalue: 1 stepvalue: 2 '
              'momentum: 0.9 weight_decay: 0.0005 snapshot_prefix: "snaps/head"\n')


def mip_batches():
    rng = np.random.default_rng(9)
    return [{"data": rng.normal(size=(4, 6)), "label": rng.integers(0, 7, size=4) * 1.0}
            for _ in range(5)]


def test_three_steps_snapshot_resume_two_equals_five_straight(tmp_path):
    data = mip_batches()
    straight = tiny_solver(tmp_path, MIP_SOLVER, data, dtype=torch.float32, net=MIP_NET)
    straight.step(5)

    first = tiny_solver(tmp_path, MIP_SOLVER, data[:3], dtype=torch.float32, net=MIP_NET)
    first.step(3)
    model, state_path = first.snapshot()
    assert model == str(tmp_path / "snaps" / "head_iter_3.caffemodel")
    assert state_path == str(tmp_path / "snaps" / "head_iter_3.solverstate")
    state = caffe_pb2.SolverState.FromString(Path(state_path).read_bytes())
    assert (state.iter, state.current_step, state.learned_net) == (3, 2, model)
    assert len(state.history) == 3  # fc5 weight, fc5 bias, fc6 weight
    for blob, history in zip(state.history, first.history):
        assert np.array_equal(io.blob_to_array(blob), history.numpy())
    saved = io.read_caffemodel(model)
    assert [layer.name for layer in saved.layer if len(layer.blobs)] == ["fc5", "fc6"]

    resumed = tiny_solver(tmp_path, MIP_SOLVER, data[3:], dtype=torch.float32, net=MIP_NET)
    resumed.restore(state_path)
    assert (resumed.iter, resumed.current_step) == (3, 2)
    assert int(resumed.net.layer("fc6").iteration) == 3  # Caffe would restart it at 0
    resumed.step(2)
    for layer in ("fc5", "fc6"):
        for ours, expected in zip(resumed.net.layer(layer).caffe_blobs(),
                                  straight.net.layer(layer).caffe_blobs()):
            assert torch.equal(ours, expected), layer
    for ours, expected in zip(resumed.history, straight.history):
        assert torch.equal(ours, expected)
    assert int(resumed.net.layer("fc6").iteration) == 5
    assert torch.equal(resumed.net.blobs["lambda"], straight.net.blobs["lambda"])


def test_resume_without_counters_file_restarts_lambda_as_caffe(tmp_path, caplog):
    first = tiny_solver(tmp_path, MIP_SOLVER, mip_batches(), dtype=torch.float32, net=MIP_NET)
    first.step(2)
    _, state_path = first.snapshot()
    counters = tmp_path / "snaps" / "head_iter_2.caffelayers.json"
    assert json.loads(counters.read_text())["nets"]["train"] == {"fc6": {"iteration": 2}}
    counters.unlink()
    resumed = tiny_solver(tmp_path, MIP_SOLVER, mip_batches(), dtype=torch.float32,
                          net=MIP_NET)
    with caplog.at_level(logging.WARNING, logger="caffelayers.solver"):
        resumed.restore(state_path)
    assert int(resumed.net.layer("fc6").iteration) == 0
    assert "restart their lambda schedule" in caplog.text
    assert torch.equal(resumed.net.layer("fc6").weight, first.net.layer("fc6").weight)


def test_solve_snapshots_on_schedule_and_after_training(tmp_path):
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" max_iter: 5 snapshot: 2 '
                         'snapshot_prefix: "out/"', batches(1)[0])
    (tmp_path / "out").mkdir()
    solver.solve()
    # A prefix naming a directory gets the solver file's name appended.
    assert sorted(p.name for p in (tmp_path / "out").glob("*.solverstate")) == [
        "solver_iter_2.solverstate", "solver_iter_4.solverstate", "solver_iter_5.solverstate"]
    assert solver.iter == 5


def test_restore_rejects_a_state_of_another_solver(tmp_path):
    first = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" snapshot_prefix: "a"',
                        batches(1))
    first.step(1)
    _, state_path = first.snapshot()
    adam = tiny_solver(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed"', batches(1))
    with pytest.raises(CaffeFormatError, match="2 history blobs.*keeps 4") as error:
        adam.restore(state_path)
    assert state_path in str(error.value)
    (tmp_path / "junk.solverstate").write_bytes(b"\xff\xff\xff")
    with pytest.raises(CaffeFormatError, match="not a Caffe solver state"):
        adam.restore(tmp_path / "junk.solverstate")


# --- bad solver files ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('base_lr: 0.1 lr_policy: "fixed"', "exactly one of net, net_param"),
    ('net: "net.prototxt" base_lr: 0.1', "lr_policy is missing"),
    ('net: "net.prototxt" lr_policy: "cosine"', "lr_policy 'cosine' is not one of"),
    ('net: "net.prototxt" lr_policy: "step"', "needs stepsize > 0"),
    ('net: "net.prototxt" lr_policy: "fixed" type: "sgd"', "solver type 'sgd'"),
    ('net: "net.prototxt" lr_policy: "fixed" type: "AdaGrad" momentum: 0.9',
     "momentum cannot be used with AdaGrad"),
    ('net: "net.prototxt" lr_policy: "fixed" type: "RMSProp" rms_decay: 1',
     "rms_decay must lie in"),
    ('net: "net.prototxt" lr_policy: "fixed" regularization_type: "L3"',
     "regularization_type 'L3'"),
    ('train_net: "net.prototxt" lr_policy: "fixed" test_iter: 1', "test_iter must be given"),
    ('net: "net.prototxt" lr_policy: "fixed" test_iter: 1', "test_interval > 0"),
    ('net: "net.prototxt" lr_policy: "fixed" iter_size: 0 average_loss: 0',
     "average_loss must be >= 1, got 0; iter_size must be >= 1"),
    ('net: "missing.prototxt" lr_policy: "fixed"', "net file 'missing.prototxt' not found"),
    ('net: "net.prototxt" lr_policy: "fixed" base_lr: fast', "parse float: fast"),
])
def test_bad_solver_file_raises_naming_it(tmp_path, text, message):
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(text)
    with pytest.raises(CaffeFormatError, match=message) as error:
        Solver(path, root=tmp_path)
    assert str(path) in str(error.value)


def test_hdf5_snapshots_are_unsupported(tmp_path):
    with pytest.raises(UnsupportedParameterError, match="HDF5"):
        tiny_solver(tmp_path, 'lr_policy: "fixed" snapshot_format: HDF5', None)


def test_batchnorm_statistics_get_history_but_no_update(tmp_path):
    net = TINY_NET.replace('bottom: "x" top: "y"', 'bottom: "xn" top: "y"').replace(
        'layer { name: "ip"', 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "xn" }\n'
        'layer { name: "ip"')
    data = batches(1)[0]
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                         'weight_decay: 0.5', data, net=net)
    assert [(b.layer, b.index) for b in solver.learnables] == [
        ("bn", 0), ("bn", 1), ("bn", 2), ("ip", 0), ("ip", 1)]
    solver.step(1)
    plain = caffelayers.Net(tmp_path / "net.prototxt", phase="TRAIN", dtype=torch.float64)
    plain(**data)  # the statistics a TRAIN forward alone accumulates
    for ours, expected in zip(solver.net.layer("bn").caffe_blobs(),
                              plain.layer("bn").caffe_blobs()):
        assert torch.equal(ours, expected)


def test_a_blob_shared_by_name_is_learned_once_from_both_gradients(tmp_path):
    net = TINY_NET.replace('param { lr_mult: 1 decay_mult: 1 }', 'param { name: "w" }') + (
        'layer { name: "ip2" type: "InnerProduct" bottom: "x" top: "y2" '
        'param { name: "w" lr_mult: 3 } '
        f'inner_product_param {{ num_output: {M} bias_term: false }} }}\n'
        'layer { name: "loss2" type: "EuclideanLoss" bottom: "y2" bottom: "t" top: "loss2" }\n')
    data = batches(1)[0]
    solver = tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"', data, net=net)
    assert [(b.layer, b.index, b.lr_mult) for b in solver.learnables] == [
        ("ip", 0, 3.0), ("ip", 1, 2.0)]
    weight, bias = start_params(solver)
    solver.step(1)
    # Caffe: the owner's diff holds both layers' gradients; lr_mult 3 comes from ip2.
    d1 = (data["x"] @ weight.T + bias - data["t"]) / N
    d2 = (data["x"] @ weight.T - data["t"]) / N
    np.testing.assert_allclose(final_params(solver)[0],
                               weight - 0.3 * (d1 + d2).T @ data["x"], rtol=1e-6)
    assert solver.net.layer("ip2").weight is solver.net.layer("ip").weight

    conflict = net.replace('param { name: "w" }', 'param { name: "w" lr_mult: 1 }')
    with pytest.raises(CaffeFormatError, match="sets lr_mult 3 where that has 1"):
        tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"', None, net=conflict)
