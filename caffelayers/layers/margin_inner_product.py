"""SphereFace's ``MarginInnerProduct`` (A-Softmax), exactly as the SphereFace fork of Caffe.

Only the label column of each row carries the angular margin, so the forward and both
backward modes run the three matrix products of a linear layer and then correct one entry
per row (gather, per-row arithmetic, scatter): no temporary of the logits' size exists
besides the logits and their gradient. Nor of the weight's size besides its gradient: where
the weight rows are normalized out of place, the logits are divided by the row lengths
instead, and the backward passes work on the weight and ``1 / |w_j|`` block by block.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import CaffeFormatError, ShapeError, UnsupportedParameterError
from ..fillers import fill
from ..registry import register_layer
from .base import CaffeLayer, as_labels, check_label_range, count
from .inner_product import InnerProduct

#: Caffe's ``MarginType`` enum in value order; the margin m is the index plus one.
MARGIN_TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE")
BACKWARD_MODES = ("caffe", "exact")


def margin_terms(cos: torch.Tensor, margin: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``psi(cos)``, its slope ``dpsi/dcos`` and ``psi - cos * slope``, elementwise.

    ``psi = (-1)^k cos(m theta) - 2k`` for ``theta`` in ``[k pi/m, (k+1) pi/m]``, written as
    Chebyshev polynomials of ``cos`` whose sign and ``k`` come from sign tests on ``cos``
    (``sign(0) = 0``), as Caffe computes them; no ``acos``. The last term is the coefficient
    of ``x / |x|`` in the derivative of ``|x| psi(x . w / |x|)`` with respect to ``x``.
    """
    if margin == 1:
        return cos, torch.ones_like(cos), torch.zeros_like(cos)
    sign_0 = torch.sign(cos)
    cos_2 = cos * cos
    if margin == 2:
        psi = 2 * sign_0 * cos_2 - 1
        return psi, 4 * sign_0 * cos, -(2 * sign_0 * cos_2 + 1)
    cos_3 = cos_2 * cos
    if margin == 3:
        sign_1 = torch.sign(cos.abs() - 0.5)          # -1 inside (pi/3, 2pi/3)
        sign_2 = sign_0 * (1 + sign_1) - 2            # -2k
        psi = sign_1 * (4 * cos_3 - 3 * cos) + sign_2
        return psi, sign_1 * (12 * cos_2 - 3), sign_2 - 8 * sign_1 * cos_3
    if margin == 4:
        cos_4 = cos_2 * cos_2
        sign_3 = sign_0 * torch.sign(2 * cos_2 - 1)    # (-1)^k
        sign_4 = 2 * sign_0 + sign_3 - 3              # -2k
        psi = sign_3 * (8 * cos_4 - 8 * cos_2 + 1) + sign_4
        slope = sign_3 * (32 * cos_3 - 16 * cos)
        return psi, slope, sign_4 - sign_3 * (24 * cos_4 - 8 * cos_2 - 1)
    raise ValueError(f"margin must be 1, 2, 3 or 4, got {margin}")


def _has_margin(margin) -> bool:
    """Whether ``margin`` changes the label column (m = 1 is the plain product)."""
    return callable(margin) or margin > 1


def _inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``1 / |w_j|`` for every row, accumulated in at least float32 (for half and bfloat16
    rows), returned in the weight's dtype: one read of the weight, no copy of it."""
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    norms = torch.linalg.vector_norm(weight, dim=1, dtype=accumulate)
    return norms.reciprocal_().to(weight.dtype)


def through_row_normalization(grad: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor,
                              gain: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``v`` of ``gain * v / |v|`` (row by row) from the one
    with respect to that product: ``gain (grad - u (grad . u)) / |v|`` with ``u = v / |v|``.

    PyTorch's weight-norm backward kernel: the dot product and the update of a row in one
    pass while it is in cache, one parallel region for the whole matrix; it returns a new
    tensor. ``norms`` and ``gain`` are ``N x 1`` columns, the norms in the kernel's
    accumulation type (float32 for half and bfloat16 rows); a row with gain 0 gets a zero
    gradient. For the ``M x K`` features of a margin head, whose gradient is new anyway;
    the weight's is corrected in place by :func:`_through_unit_rows_`.
    """
    # the kernel reads grad as contiguous memory without checking it
    grad_rows, _ = torch.ops.aten._weight_norm_interface_backward(
        grad.contiguous(), rows.contiguous(), gain.contiguous(), norms.contiguous(), 0)
    return grad_rows


# On a CPU the passes below are memory bound: run block by block, each block is read from
# memory once and the later passes find it in cache (1 MiB a thread measured best on a
# 32 MiB-L3 EPYC at one thread: 2x faster than whole-matrix passes). Nothing here allocates
# a temporary of the weight's size: a new N x K tensor in every step costs a page fault
# per page where the C allocator hands its memory back to the system between steps.
_CPU_BLOCK_BYTES = 1 << 20
#: Elsewhere (a GPU) the blocks only bound the temporaries: 64 MiB.
_DEVICE_BLOCK_BYTES = 1 << 26
#: The fewest weight rows in one block of the data gradient's product: thinner products
#: run the matrix multiply below its speed.
_MIN_PRODUCT_ROWS = 256


def _block_bytes(tensor: torch.Tensor) -> int:
    """The bytes of one block: on a CPU as many blocks (parallel regions) as one thread
    would need, whatever the thread count."""
    if tensor.device.type == "cpu":
        return _CPU_BLOCK_BYTES * torch.get_num_threads()
    return _DEVICE_BLOCK_BYTES


def _row_step(matrix: torch.Tensor) -> int:
    """How many rows of ``matrix`` make one block."""
    return max(1, _block_bytes(matrix) // max(1, matrix.shape[1] * matrix.element_size()))


def _normalized_logits(x: torch.Tensor, weight: torch.Tensor, in_place: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x_i . w_j / |w_j|`` (``M x K``, ``N x K`` -> ``M x N``) and ``1 / |w_j|``.

    With ``in_place`` (Caffe's way) the weight rows themselves are scaled to unit length
    (multiplied by ``1 / |w|``, as Caffe) and the inverse lengths are not returned (None);
    otherwise the logits' columns are divided and the weight is left alone. Class block by
    class block: a block of rows is normalized (or measured) and multiplied while it is in
    cache, so the weight is read from memory once (measured: faster than one product with
    all the classes at once).
    """
    classes = weight.shape[0]
    logits = x.new_empty(x.shape[0], classes)
    inverse_norm = None if in_place else weight.new_empty(classes)
    step = _row_step(weight)
    for start in range(0, classes, step):
        rows, block = weight[start:start + step], logits[:, start:start + step]
        if in_place:
            rows.mul_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).reciprocal_())
            torch.mm(x, rows.t(), out=block)
        else:
            inverse = inverse_norm[start:start + step]
            inverse.copy_(_inverse_row_norms(rows))
            torch.mm(x, rows.t(), out=block)
            block.mul_(inverse)
    return logits, inverse_norm


def _through_unit_rows_(grad: torch.Tensor, weight: torch.Tensor,
                        inverse_norm: torch.Tensor) -> torch.Tensor:
    """Turn the gradient with respect to ``u = w / |w|`` into the gradient with respect to
    ``w``, in place, block of rows by block: ``(g - u (g . u)) / |w|``, written with ``w``
    and ``1 / |w|`` (``(g - w (g . w) / |w|^2) / |w|``) so that no unit copy of the weight
    exists."""
    step = _row_step(grad)
    for start in range(0, grad.shape[0], step):
        block, rows = grad[start:start + step], weight[start:start + step]
        inverse = inverse_norm[start:start + step]
        along = torch.linalg.vecdot(block, rows).mul_(inverse).mul_(inverse)
        block.addcmul_(rows, along.neg_().unsqueeze(1))
        block.mul_(inverse.unsqueeze(1))
    return grad


def _product_with_unit_rows(grad: torch.Tensor, weight: torch.Tensor,
                            inverse_norm: torch.Tensor) -> torch.Tensor:
    """``grad @ (w / |w|)`` (``M x N`` by ``N x K``) with the normalized weight made one
    block of rows at a time (about a cache share, at least :data:`_MIN_PRODUCT_ROWS`
    rows), each block's product added into the ``M x K`` result: no ``N x K`` copy of the
    weight, no scaled copy of ``grad`` (which is the caller's and is left as it is)."""
    classes = weight.shape[0]
    step = max(_MIN_PRODUCT_ROWS, _row_step(weight))
    result = grad.new_zeros(grad.shape[0], weight.shape[1])
    for start in range(0, classes, step):
        unit = weight[start:start + step] * inverse_norm[start:start + step].unsqueeze(1)
        result.addmm_(grad[:, start:start + step], unit)
    return result


class _MarginProduct(torch.autograd.Function):
    """Logits of A-Softmax on a flat ``M x K`` input; see :func:`margin_inner_product`.

    ``margin`` is A-Softmax's integer m (:func:`margin_terms`), or a callable with the same
    contract, ``cos -> (f, df/dcos, f - cos df/dcos)``, which puts another margin function
    on the label column (the heads of :mod:`caffelayers.layers.margin_head`).
    ``normalize_in_place`` (Caffe mode) scales the weight rows themselves to unit length;
    otherwise the logits are divided by the row lengths column by column and the backward
    carries ``1 / |w_j|`` along, so that no normalized copy of the weight is made. ``exact``
    (never with ``normalize_in_place``) picks the true derivative, through the
    normalization; otherwise Caffe's trick gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, labels, margin, lambda_, exact, normalize_in_place):
        logits, inverse_weight_norm = _normalized_logits(x, weight, normalize_in_place)
        x_norm = torch.linalg.vector_norm(x, dim=1)
        nonzero = x_norm > 0
        slope = radial = inverse_x_norm = None
        has_margin = _has_margin(margin)
        if has_margin:
            # A zero row gets cos = 0 instead of Caffe's NaN, hence a zero label logit.
            inverse_x_norm = torch.where(nonzero, x_norm, torch.ones_like(x_norm)).reciprocal_()
            column = labels.unsqueeze(1)
            product = logits.gather(1, column).squeeze(1)              # x . w_y / |w_y|
            cos = product * inverse_x_norm
            psi, slope, radial = margin(cos) if callable(margin) else margin_terms(cos, margin)
            label_logit = (x_norm * psi + lambda_ * product) * (1.0 / (1.0 + lambda_))
            logits.scatter_(1, column, label_logit.unsqueeze(1))
        ctx.save_for_backward(x, weight, labels, slope, radial, inverse_x_norm, nonzero,
                              inverse_weight_norm)
        ctx.has_margin, ctx.lambda_, ctx.exact = has_margin, lambda_, exact
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits):
        (x, weight, labels, slope, radial, inverse_x_norm, nonzero,
         inverse_weight_norm) = ctx.saved_tensors
        has_margin, exact = ctx.has_margin, ctx.exact
        scale = 1.0 / (1.0 + ctx.lambda_)
        grad_x = grad_weight = grad_label = None
        if has_margin:
            grad_label = grad_logits.gather(1, labels.unsqueeze(1)).squeeze(1) * scale
        if ctx.needs_input_grad[0]:
            if inverse_weight_norm is None:   # unit rows already
                grad_x = torch.mm(grad_logits, weight)
            else:
                grad_x = _product_with_unit_rows(grad_logits, weight, inverse_weight_norm)
            if has_margin:
                # The label logit's derivative is (coef_w * u_y + coef_x * x + lambda u_y) /
                # (1 + lambda), u_y = w_y / |w_y|; the product above already added u_y.
                coef_w, coef_x = slope, radial * inverse_x_norm
                if not exact:
                    # Caffe's trick: the two coefficients rescaled to unit length.
                    length = torch.hypot(coef_w, coef_x)
                    coef_w, coef_x = coef_w / length, coef_x / length
                label_coef = grad_label * (coef_w - 1)
                if inverse_weight_norm is not None:
                    label_coef = label_coef * inverse_weight_norm.index_select(0, labels)
                grad_x.addcmul_(weight.index_select(0, labels), label_coef.unsqueeze(1))
                grad_x.addcmul_(x, (grad_label * coef_x).unsqueeze(1))
                grad_x.mul_(nonzero.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            # Caffe's weight gradient is top_diff^T x whatever the margin.
            grad_weight = torch.mm(grad_logits.t(), x)
            if exact:   # never with rows normalized in place: inverse_weight_norm is set
                if has_margin:
                    grad_weight.index_add_(0, labels,
                                           x * (grad_label * (slope - 1)).unsqueeze(1))
                _through_unit_rows_(grad_weight, weight, inverse_weight_norm)
        return grad_x, grad_weight, None, None, None, None, None


def margin_inner_product(x: torch.Tensor, weight: torch.Tensor,
                         labels: torch.Tensor | None, margin: int = 4,
                         lambda_: float = 0.0, backward: str = "exact") -> torch.Tensor:
    """Stateless A-Softmax logits: the weight rows are normalized out of place.

    ``logits[i, j] = x_i . w_j / |w_j|`` except at ``j = labels[i]``, where it is
    ``(|x_i| psi(cos) + lambda x_i . w_j / |w_j|) / (1 + lambda)`` (see :func:`margin_terms`).

    Args:
        x: ``M x K`` input.
        weight: ``N x K`` weight, any row length.
        labels: ``M`` class indices (integer or float holding integers); may be None when
            ``margin`` is 1.
        margin: m, 1 to 4.
        lambda_: the mixing weight of the plain product in the label logit.
        backward: ``"exact"`` for the true derivative (through the normalization), or
            ``"caffe"`` for Caffe's trick gradient (the weight gets ``top_diff^T x``).
    """
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if margin > 1:
        labels = as_labels(labels).reshape(-1)
    return _MarginProduct.apply(x, weight, labels, margin, float(lambda_),
                                backward == "exact", False)


def head_logits_shape(layer, bottom_shapes, in_features: int, classes: int):
    """The shape rule of a classification head: data flattened from ``layer.axis`` to K
    features, an optional label bottom with one label per row; logits ``rows x classes``."""
    if len(bottom_shapes) not in (1, 2):
        raise layer.shape_error(bottom_shapes, "a data bottom and a label bottom")
    shape = tuple(bottom_shapes[0])
    axis = layer.canonical_axis(layer.axis, len(shape), bottom_shapes)
    if count(shape, axis) != in_features:
        raise layer.shape_error(bottom_shapes, f"the axes from {axis} on must hold "
                                f"{in_features} elements (K), got {count(shape, axis)}")
    rows = count(shape, 0, axis)
    if len(bottom_shapes) == 2 and count(bottom_shapes[1]) != rows:
        raise layer.shape_error(bottom_shapes, f"one label per row: the label must have "
                                f"{rows} elements, got {count(bottom_shapes[1])}")
    return shape[:axis] + (classes,)


@register_layer("MarginInnerProduct")
class MarginInnerProduct(CaffeLayer):
    r"""SphereFace's A-Softmax head: a bias-free inner product with unit-length weight rows
    whose label logit carries the angular margin m.

    .. math::
        y_{ij} = x_i \cdot \hat w_j \ (j \ne l_i), \qquad
        y_{i l_i} = \frac{|x_i|\,\psi(\cos\theta_i) + \lambda\, x_i \cdot \hat w_{l_i}}
                         {1 + \lambda},
        \quad \psi = (-1)^k \cos(m\theta) - 2k,\
        \theta \in [\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}]

    with :math:`\hat w_j = w_j / |w_j|` and
    :math:`\lambda = \max(\text{base}\,(1 + \gamma\, t)^{-\text{power}}, \lambda_{min})` at
    iteration t. Every forward first advances t, so the first forward uses
    ``iteration + 1``.

    Args:
        in_features: K, the size of each flattened input row.
        num_output: N, the number of classes.
        margin_type: ``"SINGLE"``, ``"DOUBLE"``, ``"TRIPLE"`` or ``"QUADRUPLE"`` (m = 1..4),
            or the integer m. SINGLE is the plain product with unit weights (lambda unused).
        base, gamma, power, lambda_min: the lambda schedule above.
        iteration: the iteration count t before the first forward.
        axis: the first input axis flattened into K (negative counts from the end).
        backward: ``"caffe"`` reproduces Caffe: the forward normalizes the weight parameter
            in place and the backward is Caffe's trick gradient (weight gradient
            ``top_diff^T x``; data gradient with the label column's two derivative
            coefficients rescaled to unit length). ``"exact"`` normalizes out of place and
            returns the true derivative of the same forward, through the normalization
            (the sign tests' boundaries treated as constant).

    Shape:
        - x: :math:`(d_0, \ldots, d_{axis-1}, \ldots)` with :math:`M = d_0 \cdots d_{axis-1}`
          rows of K elements each.
        - label: M values (any shape), integers in ``[0, N)``; not needed with
          ``margin=False`` or SINGLE.
        - logits: :math:`(d_0, \ldots, d_{axis-1}, N)`.
        - lambda: :math:`(1)`.

    Attributes:
        weight: the :math:`N \times K` parameter (Caffe's blob 0). In ``"caffe"`` mode it
            holds unit rows after every forward, and a solver updates the normalized weight.
        iteration: a buffer with t, saved in ``state_dict`` so that a resumed run continues
            the schedule (Caffe restarts it from the prototxt's ``iteration``).

    Example::

        >>> head = MarginInnerProduct(512, 10572, "QUADRUPLE", base=1000, gamma=0.12,
        ...                           power=1, lambda_min=5)
        >>> logits, lambda_ = head(features, labels)             # train: the margin logits
        >>> scores, _ = head(features, margin=False)             # test: |x| cos(theta_j)

    Caffe:
        ``margin_inner_product_param`` maps ``num_output``, ``type`` (enum SINGLE=0 ..
        QUADRUPLE=3, default SINGLE), ``weight_filler``, ``axis``, ``base``, ``gamma``,
        ``power``, ``iteration`` and ``lambda_min`` to the arguments of the same names.
        Quirks reproduced: the in-place normalization of the stored weight on every forward;
        ``k`` and the sign from sign tests (``sign(0) = 0``), not from ``acos``; lambda
        computed in the input's precision. Differences, on purpose: the lambda top is
        optional (Caffe requires it); an all-zero input row gives zero logits and, for
        m > 1, a zero input gradient (Caffe gives NaN); the iteration count survives
        ``state_dict``.
    """

    __constants__: ClassVar[list[str]] = [
        "in_features", "num_output", "margin", "base", "gamma", "power", "lambda_min",
        "axis", "backward"]

    def __init__(self, in_features: int, num_output: int, margin_type="QUADRUPLE",
                 base: float = 1.0, gamma: float = 0.0, power: float = 1.0,
                 lambda_min: float = 0.0, iteration: int = 0, axis: int = 1,
                 backward: str = "caffe") -> None:
        super().__init__()
        if isinstance(margin_type, str):
            if margin_type.upper() not in MARGIN_TYPES:
                raise UnsupportedParameterError(
                    f"MarginInnerProduct: margin_type {margin_type!r} is not one of "
                    f"{', '.join(MARGIN_TYPES)}")
            margin = MARGIN_TYPES.index(margin_type.upper()) + 1
        elif isinstance(margin_type, int) and 1 <= margin_type <= 4:
            margin = int(margin_type)
        else:
            raise UnsupportedParameterError(
                f"MarginInnerProduct: margin_type must be a name in {MARGIN_TYPES} or an "
                f"integer m from 1 to 4, got {margin_type!r}")
        if backward not in BACKWARD_MODES:
            raise UnsupportedParameterError(
                f"MarginInnerProduct: backward must be one of {', '.join(BACKWARD_MODES)}, "
                f"got {backward!r}")
        self.in_features = int(in_features)
        self.num_output = int(num_output)
        self.margin = margin
        self.base, self.gamma, self.power = float(base), float(gamma), float(power)
        self.lambda_min = float(lambda_min)
        self.axis = int(axis)
        self.backward = backward
        if self.in_features < 1:  # a bottom without values per row: no head to build
            raise UnsupportedParameterError(f"the bottom has {self.in_features} values per "
                                            "row (K); a margin head needs at least one")
        self.weight = nn.Parameter(torch.empty(self.num_output, self.in_features))
        # Caffe's xavier filler; from_caffe applies the prototxt's own filler instead.
        bound = math.sqrt(3.0 / self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        self.register_buffer("iteration", torch.tensor(int(iteration), dtype=torch.long))
        #: whether output_shapes lists the lambda top (a Caffe net may name only the logits);
        #: forward returns both either way.
        self.lambda_top = True

    @property
    def margin_type(self) -> str:
        return MARGIN_TYPES[self.margin - 1]

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_caffe(cls, param, bottom_shapes, ctx) -> MarginInnerProduct:
        p = param.margin_inner_product_param
        if len(bottom_shapes) != 2 or len(param.top) not in (1, 2):
            raise CaffeFormatError(
                f"layer {param.name!r} (MarginInnerProduct) takes two bottoms (data, label) "
                f"and one or two tops (logits, lambda), got {len(bottom_shapes)} and "
                f"{len(param.top)}")
        if p.type not in range(len(MARGIN_TYPES)):
            raise UnsupportedParameterError(
                f"layer {param.name!r}: margin type {p.type} is not one of "
                f"{', '.join(f'{n}={i}' for i, n in enumerate(MARGIN_TYPES))}")
        if p.num_output < 1:
            raise UnsupportedParameterError(
                f"layer {param.name!r}: num_output must be positive, got {p.num_output}")
        shape = tuple(bottom_shapes[0])
        if not -len(shape) <= p.axis < len(shape):
            raise ShapeError(param.name, "MarginInnerProduct", bottom_shapes,
                             f"axis {p.axis} must lie in [{-len(shape)}, {len(shape)}) for a "
                             f"{len(shape)}-D bottom")
        axis = p.axis % len(shape)
        backward = ctx.options.get("margin_backward", "caffe")
        layer = cls(count(shape, axis), p.num_output, margin_type=MARGIN_TYPES[p.type],
                    base=p.base, gamma=p.gamma, power=p.power, lambda_min=p.lambda_min,
                    iteration=p.iteration, axis=p.axis, backward=backward)
        layer.layer_name = param.name
        layer.lambda_top = len(param.top) == 2
        if ctx.fill:
            fill(layer.weight, p.weight_filler if p.HasField("weight_filler") else None,
                 ctx.generator, param.name)
        return layer

    def output_shapes(self, bottom_shapes):
        logits = head_logits_shape(self, bottom_shapes, self.in_features, self.num_output)
        return [logits, (1,)] if self.lambda_top else [logits]

    def caffe_blobs(self):
        return [self.weight]

    # -- the schedule ----------------------------------------------------------------------
    def lambda_at(self, iteration: int, dtype: torch.dtype = torch.float32) -> float:
        """``max(base * (1 + gamma * iteration)^(-power), lambda_min)`` in ``dtype``'s
        precision, as Caffe computes it in its ``Dtype``."""
        real = np.float64 if dtype == torch.float64 else np.float32
        with np.errstate(all="ignore"):  # Caffe lets a bad schedule produce inf or NaN
            value = real(self.base) * np.power(real(1) + real(self.gamma) * real(iteration),
                                               -real(self.power))
        # std::max(value, lambda_min) keeps value unless it is smaller (NaN is kept).
        return float(max(value, real(self.lambda_min)))

    # -- the math --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None,
                margin: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and lambda (shape ``(1,)``).

        With ``margin=False`` the result is the m = 1 logits ``x . w_j / |w_j|`` (argmax
        equal to that of ``cos theta_j``), computed with an out-of-place normalization and
        without advancing the iteration count: what test-time accuracy needs. Lambda is then
        the value of the current iteration.
        """
        shape = tuple(x.shape)
        bottom_shapes = [shape] if label is None else [shape, tuple(label.shape)]
        top_shape = self.output_shapes(bottom_shapes)[0]
        flat = x.reshape(count(shape, 0, len(top_shape) - 1), self.in_features)
        use_margin = self.margin if margin else 1
        labels = None
        if use_margin > 1:
            if label is None:
                raise self.shape_error(bottom_shapes, f"a label bottom: {self.margin_type} "
                                       "needs the label of every row")
            labels = as_labels(label).reshape(-1).to(self.weight.device)
            check_label_range(self, labels, self.num_output)
        if margin:
            with torch.no_grad():
                self.iteration += 1
        lambda_ = self.lambda_at(int(self.iteration), x.dtype)
        in_place = margin and self.backward == "caffe"
        logits = _MarginProduct.apply(flat, self.weight, labels, use_margin, lambda_,
                                      self.backward == "exact", in_place)
        return logits.view(top_shape), x.new_full((1,), lambda_)

    # -- export ----------------------------------------------------------------------------
    def to_inner_product(self):
        """A bias-free ``InnerProduct`` with this layer's unit-length weight rows: the
        test-time head (the m = 1 logits), for deployment and export."""
        plain = InnerProduct(self.in_features, self.num_output, bias_term=False,
                             axis=self.axis)
        with torch.no_grad():
            unit = self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)
            plain.weight.copy_(unit)
        plain.to(device=self.weight.device, dtype=self.weight.dtype)
        plain.layer_name = self.layer_name
        return plain

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"num_output={self.num_output}",
                 f"margin_type={self.margin_type!r}"]
        defaults = {"base": 1.0, "gamma": 0.0, "power": 1.0, "lambda_min": 0.0, "axis": 1,
                    "backward": "caffe"}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        if int(self.iteration):
            parts.append(f"iteration={int(self.iteration)}")
        return ", ".join(parts)
