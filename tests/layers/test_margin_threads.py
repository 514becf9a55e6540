"""The row normalizations behind MarginInnerProduct and MarginHead, whatever the thread
count, the block size, the memory layout and the dtype: each against a float64 reference
written out from the formula."""

import pytest
import torch

from caffelayers.layers import margin_inner_product as mip
from caffelayers.layers.margin_head import MarginHead, margin_head
from caffelayers.layers.margin_inner_product import margin_inner_product


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
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_in_place_weight_projection_any_block_and_thread_count(count, block_bytes, threads,
                                                               monkeypatch):
    torch.set_num_threads(count)
    monkeypatch.setattr(mip, "_CPU_BLOCK_BYTES", block_bytes)  # 64 B: many blocks
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 5, generator=generator)
    grad = torch.randn(37, 5, generator=generator)
    unit, inverse_norm = mip._unit_rows_and_inverse_norms(weight)
    torch.testing.assert_close(unit.double(), weight.double() / weight.double().norm(
        dim=1, keepdim=True))
    result = mip._through_unit_rows_(grad.clone(), unit, inverse_norm)
    expected = reference_projection(grad, weight, torch.ones(37, 1))
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)


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
