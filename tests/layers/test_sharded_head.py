"""The sharded margin heads against the single-process layers, in float64.

One ``torch.multiprocessing.spawn`` per world size (P = 2 and 3, N = 11 classes, so no P
divides N) runs every case for three iterations: forward, backward, an SGD step. The ranks
save what they computed; the test process replays each case with the unsharded
MarginInnerProduct / MarginHead followed by ``softmax_loss`` (SoftmaxWithLoss) on all P * M
rows and compares the loss, accuracy, lambda, input gradient, weight gradient and the weight
itself (Caffe mode normalizes it in place).
"""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caffelayers.errors import CaffeLayersError, UnsupportedParameterError
from caffelayers.layers.accuracy import Accuracy
from caffelayers.layers.margin_head import MarginHead
from caffelayers.layers.margin_inner_product import MarginInnerProduct
from caffelayers.layers.sharded_head import (
    ShardedMarginHead,
    ShardedMarginInnerProduct,
    gather_shards,
    shard_range,
    take_shard,
)
from caffelayers.losses.infogain import softmax_loss

N, K, M = 11, 5, 6               # classes, features, rows per rank
ITERATIONS = 3
LR = 0.5                          # large enough that the weights move between iterations
SCHEDULE = {"base": 2.0, "gamma": 1.0, "power": 1.0, "lambda_min": 0.1}   # lambda 1, 2/3, 1/2


def _case(name: str, layer: str, args: dict, **extra) -> dict:
    return {"name": name, "layer": layer, "args": args, **extra}


def _mip(margin: int, backward: str) -> dict:
    return {"margin_type": margin, "backward": backward, **SCHEDULE}


def _cases():
    cases = [_case(f"mip-m{margin}-{backward}", "mip", _mip(margin, backward))
             for margin in (1, 2, 3, 4) for backward in ("caffe", "exact")]
    cases.append(_case("mip-caffe-loss-ignore", "mip", _mip(4, "exact"),
                       loss={"loss_mode": "caffe", "ignore_label": 3}))
    heads = [("sphere", None, 4, False, 0.5), ("sphere", 8.0, 2, False, 0.0),
             ("cos", 8.0, 0.35, False, 0.0), ("arc", 8.0, 0.5, False, 0.0),
             ("arc", 8.0, 0.5, True, 0.0), ("combined", 8.0, (1.0, 0.3, 0.2), False, 0.0),
             ("combined", 8.0, (2.0, 0.1, 0.1), False, 0.0), ("arc", 8.0, 0.0, False, 0.0)]
    for kind, s, m, easy, lambda_ in heads:
        cases.append(_case(f"head-{kind}-{m}-{'easy' if easy else 's'}{s}", "head",
                           {"kind": kind, "s": s, "m": m, "easy_margin": easy,
                            "lambda_": lambda_}))
    # class sampling: rate 1 is the unsampled code; 0.99 keeps every row through sampling
    cases.append(_case("mip-m4-caffe-rate1", "mip", _mip(4, "caffe"), sample_rate=1.0))
    cases.append(_case("mip-m4-exact-rate0.99", "mip", _mip(4, "exact"), sample_rate=0.99))
    cases += [_case(f"mip-m{margin}-{backward}-sampled", "mip", _mip(margin, backward),
                    sample_rate=0.4)
              for margin in (1, 2, 3, 4) for backward in ("caffe", "exact")]
    cases.append(_case("head-arc-sampled", "head", {"kind": "arc", "s": 8.0, "m": 0.5},
                       sample_rate=0.4))
    return cases


CASES = _cases()


def _data(world: int):
    """The full weight and, per iteration, all ranks' features and labels."""
    generator = torch.Generator().manual_seed(world)
    weight = torch.randn(N, K, generator=generator, dtype=torch.float64)
    steps = []
    for _ in range(ITERATIONS):
        x = torch.randn(world * M, K, generator=generator, dtype=torch.float64)
        x[1] = 0.0          # a zero row: zero logits and, with a margin, a zero gradient
        labels = torch.randint(0, N, (world * M,), generator=generator)
        steps.append((x, labels))
    return weight, steps


def _build(case):
    loss = case.get("loss", {})
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    if case["layer"] == "mip":
        return ShardedMarginInnerProduct(K, N, sample_rate=case.get("sample_rate", 1.0),
                                         generator=generator, **case["args"], **loss)
    return ShardedMarginHead(K, N, sample_rate=case.get("sample_rate", 1.0),
                             generator=generator, **case["args"], **loss)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        weight, steps = _data(world)
        results = {}
        for case in CASES:
            head = _build(case).double()
            with torch.no_grad():
                head.weight.copy_(take_shard(weight, rank, world))
            records = []
            for x_all, labels_all in steps:
                x = x_all[rank * M:(rank + 1) * M].clone().requires_grad_()
                labels = labels_all[rank * M:(rank + 1) * M].to(torch.float64)
                head.weight.grad = None
                result = head(x, labels, with_accuracy=True)
                result.loss.backward()
                classes = [torch.empty(0)] * world
                dist.all_gather_object(classes, head.last_classes)
                records.append({
                    "loss": result.loss.detach(), "accuracy": result.accuracy,
                    "lambda_": torch.tensor(result.lambda_, dtype=torch.float64), "grad_x": x.grad,
                    "grad_w": gather_shards(head.weight.grad, N), "weight": gather_shards(
                        head.weight, N), "classes": torch.cat(classes)})
                with torch.no_grad():
                    head.weight -= LR * head.weight.grad
            results[case["name"]] = records
        results["errors"] = _bad_input_errors(rank)
        results["gathered_to"] = [gather_shards(take_shard(weight, rank, world), N, dst=dst)
                                  for dst in range(world)]
        # a group without global rank 0: its rank g is global rank g + 1
        others = dist.new_group(list(range(1, world)))
        if rank > 0:
            results["gathered_in_group"] = gather_shards(
                take_shard(weight, rank - 1, world - 1), N, others, dst=0)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_input_errors(rank: int) -> list:
    """The messages every rank raises for bad input: all ranks see the same gathered
    labels and row counts, so they all raise and none waits in a collective."""
    head = ShardedMarginInnerProduct(K, N)
    messages = []
    for rows, label in ((M, N), (M - rank, 0)):
        x = torch.randn(rows, K)
        try:
            head(x, torch.full((rows,), label))
        except CaffeLayersError as error:
            messages.append(str(error))
    return messages


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def sharded_run(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"sharded{world}")
    mp.spawn(_worker, args=(world, str(folder / "store"), str(folder)), nprocs=world,
             join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return world, ranks


def _reference_step(case, weight, iteration, x, labels, classes):
    """One step of the unsharded layer + SoftmaxWithLoss on the classes ``classes`` (all, or
    the sampled ones): loss, accuracy, lambda, input gradient, the weight gradient and the
    weight after the forward (both N x K, zero / unchanged outside ``classes``)."""
    loss_args = case.get("loss", {})
    rows = weight[classes].clone()
    local_labels = torch.searchsorted(classes, labels)
    if case["layer"] == "mip":
        layer = MarginInnerProduct(K, len(classes), **case["args"],
                                   iteration=iteration).double()
    else:
        layer = MarginHead(K, len(classes), **case["args"]).double()
    with torch.no_grad():
        layer.weight.copy_(rows)
    x = x.clone().requires_grad_()
    out = layer(x, local_labels.double())
    logits, lambda_ = (out if case["layer"] == "mip" else (out, torch.tensor([
        case["args"].get("lambda_", 0.0)])))
    # the ignore case is unsampled: its local labels are the global ones. The margin still
    # applies to an ignored row's label column; only the loss skips the row
    ignore = loss_args.get("ignore_label")
    loss = softmax_loss(logits, local_labels, ignore_label=ignore,
                        mode=loss_args.get("loss_mode", "exact"))
    accuracy = Accuracy(ignore_label=ignore)(logits.detach(), local_labels)
    loss.backward()
    grad_w = torch.zeros_like(weight)
    grad_w[classes] = layer.weight.grad
    after = weight.clone()
    after[classes] = layer.weight.detach()
    return loss.detach(), accuracy, float(lambda_[0]), x.grad, grad_w, after


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sharded_equals_single_process(sharded_run, case):
    world, ranks = sharded_run
    weight, steps = _data(world)
    records = [rank[case["name"]] for rank in ranks]
    for iteration, (x, labels) in enumerate(steps):
        got = [r[iteration] for r in records]
        classes = got[0]["classes"]
        sampled = case.get("sample_rate", 1.0) < 1
        if sampled:
            # every rank holds its positives and at least ceil(rate * N_r) classes
            for rank in range(world):
                start, end = shard_range(N, world, rank)
                mine = classes[(classes >= start) & (classes < end)]
                positives = labels[(labels >= start) & (labels < end)].unique()
                assert set(positives.tolist()) <= set(mine.tolist())
                assert len(mine) >= min(end - start, math.ceil(case["sample_rate"]
                                                               * (end - start)))
        else:
            assert torch.equal(classes, torch.arange(N))
        loss, accuracy, lambda_, grad_x, grad_w, after = _reference_step(
            case, weight, iteration, x, labels, classes)
        for rank in range(world):
            # every rank reports the same loss, accuracy, lambda and gathered weights
            torch.testing.assert_close(got[rank]["loss"], loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[rank]["accuracy"], accuracy)
            assert float(got[rank]["lambda_"]) == lambda_
            torch.testing.assert_close(got[rank]["grad_w"], grad_w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[rank]["weight"], after, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([g["grad_x"] for g in got]), grad_x,
                                   rtol=1e-5, atol=1e-5)
        if case.get("sample_rate", 1.0) == 1.0 and case["name"].endswith("rate1"):
            plain = [rank["mip-m4-caffe"][iteration] for rank in ranks]
            for a, b in zip(got, plain):
                assert all(torch.equal(a[key], b[key]) for key in a)
        weight = after - LR * grad_w


def test_the_test_can_fail(sharded_run):
    """A reference with the other backward mode differs: the tolerance is not vacuous."""
    world, ranks = sharded_run
    weight, steps = _data(world)
    x, labels = steps[0]
    case = next(c for c in CASES if c["name"] == "mip-m4-exact")
    other = dict(case, args=dict(case["args"], backward="caffe"))
    *_, grad_w, _ = _reference_step(other, weight, 0, x, labels, torch.arange(N))
    assert not torch.allclose(ranks[0]["mip-m4-exact"][0]["grad_w"], grad_w, atol=1e-3)


def test_shard_range_splits_like_caffe():
    assert [shard_range(11, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [shard_range(10, 2, r) for r in range(2)] == [(0, 5), (5, 10)]
    for classes, world in ((7, 7), (1000, 3), (13, 4)):
        ranges = [shard_range(classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(UnsupportedParameterError, match="at least one"):
        shard_range(2, 3, 0)
    with pytest.raises(UnsupportedParameterError, match="rank 3"):
        shard_range(11, 3, 3)
    full = torch.arange(22.0).reshape(11, 2)
    assert torch.equal(torch.cat([take_shard(full, r, 3) for r in range(3)]), full)


def test_without_a_process_group_the_error_says_what_to_do():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(CaffeLayersError, match="init_process_group"):
        ShardedMarginInnerProduct(K, N)


def test_bad_input_raises_on_every_rank(sharded_run):
    world, ranks = sharded_run
    for rank in ranks:
        labels, rows = rank["errors"]
        assert f"labels must lie in [0, {N}), got [{N}]" in labels
        assert f"the same number of rows on every rank, got {[M - r for r in range(world)]}" in rows


def test_gather_to_one_rank(sharded_run):
    """``gather_shards(dst=r)``: rank r alone receives the full weight, in a subgroup too."""
    world, ranks = sharded_run
    weight, _ = _data(world)
    for rank, result in enumerate(ranks):
        for dst, gathered in enumerate(result["gathered_to"]):
            if rank == dst:
                assert torch.equal(gathered, weight)
            else:
                assert gathered is None
        # rank 0 of the group of the others is global rank 1
        if rank == 1:
            assert torch.equal(result["gathered_in_group"], weight)
        elif rank > 1:
            assert result["gathered_in_group"] is None
