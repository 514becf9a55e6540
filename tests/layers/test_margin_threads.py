"""The row normalizations behind MarginInnerProduct and MarginHead, whatever the thread
count, the block size, the memory layout and the dtype: each against a float64 reference
written out from the formula."""

import pytest
import torch

from caffelayers.layers import margin_inner_product as mip
from caffelayers.layers.margin_head import MarginHead, margin_head
from caffelayers.layers.margin_inner_product import (
    MarginInnerProduct,
    margin_inner_product,
)


def reference_projection(grad, rows, gain):
    """``gain (g - u (g . u)) / |v|`` in float64, ``u = v / |v|``."""
    grad, rows = grad.double(), rows.double()
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows / norms
    along = (grad * unit).sum(1, keepdim=True)
    return gain.double() * (grad - unit * along) / norms


@pytest.fixture
def threads():
    """Restore the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("block_bytes, block_rows", [(64, 1), (64, 4), (1 << 20, 256)])
def test_blocked_passes_any_block_and_thread_count(count, block_bytes, block_rows, threads,
                                                   monkeypatch):
    """The backward's two blocked passes through ``w / |w|`` (one to many blocks, the last
    one short) against float64 formulas with an explicit unit weight."""
    torch.set_num_threads(count)
    monkeypatch.setattr(mip, "_CPU_BLOCK_BYTES", block_bytes)  # 64 B: many blocks
    monkeypatch.setattr(mip, "_MIN_PRODUCT_ROWS", block_rows)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 5, generator=generator)
    grad = torch.randn(37, 5, generator=generator)
    upstream = torch.randn(6, 37, generator=generator)
    inverse_norm = mip._inverse_row_norms(weight)
    torch.testing.assert_close(inverse_norm.double(), 1 / weight.double().norm(dim=1))
    unit = weight.double() / weight.double().norm(dim=1, keepdim=True)
    product = mip._product_with_unit_rows(upstream, weight, inverse_norm)
    torch.testing.assert_close(product.double(), upstream.double() @ unit, rtol=1e-5,
                               atol=1e-6)
    result = mip._through_unit_rows_(grad.clone(), weight, inverse_norm)
    expected = reference_projection(grad, weight, torch.ones(37, 1))
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_blocked_normalized_logits(in_place, block_bytes, monkeypatch):
    """The forward's class blocks: ``x . w_j / |w_j|`` and, in place (Caffe mode), unit
    rows left in the weight; otherwise the weight untouched and ``1 / |w_j|`` returned."""
    monkeypatch.setattr(mip, "_CPU_BLOCK_BYTES", block_bytes)  # 64 B: many blocks
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(37, 5, generator=generator)
    x = torch.randn(6, 5, generator=generator)
    before = weight.clone()
    norms = weight.double().norm(dim=1, keepdim=True)
    unit = weight.double() / norms
    logits, inverse_norm = mip._normalized_logits(x, weight, in_place)
    torch.testing.assert_close(logits.double(), x.double() @ unit.t(), rtol=1e-5, atol=1e-6)
    if in_place:
        assert inverse_norm is None
        torch.testing.assert_close(weight.double(), unit)
    else:
        assert torch.equal(weight, before)
        torch.testing.assert_close(inverse_norm.double(), 1 / norms.squeeze(1))


def test_fused_projection_reads_strided_inputs_correctly():
    """PyTorch's weight-norm backward kernel reads its gradient as contiguous memory
    without checking: through_row_normalization must hand it contiguous tensors."""
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(6, 8, generator=generator)[:, ::2]       # strided columns
    rows = torch.randn(4, 6, generator=generator).t()           # transposed
    gain = torch.full((6, 1), 3.0)
    norms = rows.norm(dim=1, keepdim=True)
    result = mip.through_row_normalization(grad, rows, norms, gain)
    torch.testing.assert_close(result.double(), reference_projection(grad, rows, gain),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_exact_weight_gradient_with_a_strided_weight(dtype):
    """A transposed weight (not contiguous) gives the gradient of a contiguous copy."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 5, (8,), generator=generator)
    upstream = torch.randn(8, 5, generator=generator, dtype=torch.float64).to(dtype)
    strided = torch.randn(6, 5, generator=generator, dtype=torch.float64).to(dtype).t()
    strided.requires_grad_()
    contiguous = strided.detach().contiguous().requires_grad_()
    for weight in (strided, contiguous):
        margin_inner_product(x, weight, labels, margin=4, backward="exact").backward(upstream)
    torch.testing.assert_close(strided.grad, contiguous.grad)


def test_head_gradients_agree_across_thread_counts(threads):
    """Two threads give the one-thread gradients of a head (features normalized and scaled,
    a zero feature row kept at zero) up to rounding."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=generator)
    x[5] = 0
    labels = torch.randint(0, 300, (64,), generator=generator)
    upstream = torch.randn(64, 300, generator=generator)
    head = MarginHead(16, 300, "arc", s=30.0)
    grads = []
    for count in (1, 2):
        torch.set_num_threads(count)
        xs = x.clone().requires_grad_()
        head.weight.grad = None
        head(xs, labels).backward(upstream)
        grads.append((xs.grad, head.weight.grad))
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    assert not grads[0][0][5].any()


def test_feature_normalization_gradient_in_float64():
    """The scaled feature normalization's gradient (through the fused kernel) against
    torch.autograd.gradcheck, zero margin so that only the normalizations act."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (5,), generator=generator)
    assert torch.autograd.gradcheck(
        lambda a, w: margin_head(a, w, labels, "cos", s=3.0, m=0.2), (x, weight))


@pytest.mark.parametrize("make", [
    lambda K, N: MarginInnerProduct(K, N, "QUADRUPLE", backward="exact"),
    lambda K, N: MarginHead(K, N, "arc", s=30.0)], ids=["exact", "arc-head"])
def test_no_temporary_of_the_weight_size(make, peak_allocation, monkeypatch):
    """Out-of-place normalization without a normalized N x K copy of the weight: a step
    allocates at most a fraction of the weight's size beyond the plain product's (the
    logits, the gradients). A unit copy would add one N x K tensor, kept to the backward."""
    monkeypatch.setattr(mip, "_CPU_BLOCK_BYTES", 1 << 16)  # blocks well below N x K
    M, K, N = 8, 512, 2048
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(M, K, generator=generator, requires_grad=True)
    labels = torch.randint(0, N, (M,), generator=generator)
    upstream = torch.randn(M, N, generator=generator)
    weight = torch.randn(N, K, generator=generator, requires_grad=True)
    baseline = peak_allocation(lambda: (x @ weight.t()).backward(upstream))
    layer = make(K, N)

    def step():
        logits = layer(x, labels)
        (logits[0] if isinstance(logits, tuple) else logits).backward(upstream)

    extra = peak_allocation(step) - baseline
    assert extra < N * K * 4 / 4, extra
