"""rel_pos_bias: the relative position bias of the paper's temporal attention, compiled in csrc/.

Reference: vdm_fast/reference/rel_pos_bias.py. Fast code: csrc/cpu/rel_pos_bias.cpp, csrc/cuda/rel_pos_bias.cu,
bound in csrc/bindings.cpp. Tests: tests/test_rel_pos_bias.py.
"""

from __future__ import annotations

import functools

import torch

from vdm_fast import _checks, _dispatch, _ext
from vdm_fast import reference as ref
from vdm_fast.kernels._common import device_guard

SPEC = _dispatch.OpSpec("rel_pos_bias", ext_devices=("cpu", "cuda"))


def rel_pos_bias(
    table: torch.Tensor, positions: torch.Tensor, *, max_distance: int = 32, bidirectional: bool = True
) -> torch.Tensor:
    """Relative position bias for attention over frames.

    table: (num_buckets, heads) float, the weight of an nn.Embedding(num_buckets, heads).
    positions: (T,) or (B, T) integer frame indices (any values: frameskip, kept frames of an extension step).
    Returns bias (heads, T, T) or (B, heads, T, T), dtype of table, with
    bias[..., h, i, j] = table[bucket(positions[..., j] - positions[..., i]), h] and `bucket` T5's
    `_relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)`.
    The gradient w.r.t. table is summed in fp32 in a fixed order (bitwise reproducible).
    """
    _check(table, positions, max_distance, bidirectional)
    impl = _dispatch.select(SPEC, table.device, table.dtype)
    if impl == "reference":
        return ref.rel_pos_bias(table, positions, max_distance=max_distance, bidirectional=bidirectional)
    return torch.ops.vdm_fast.rel_pos_bias(table, positions, max_distance, bidirectional, impl)


def _check(table, positions, max_distance, bidirectional) -> None:
    _checks.tensor(table, "table", ndim=2, floating=True)
    _checks.tensor(positions, "positions", ndim=(1, 2), integer=True)
    _checks.same_device(table=table, positions=positions)
    _checks.positive_int(max_distance, "max_distance")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    num_buckets = table.shape[0]
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1:
        need = 4 if bidirectional else 2
        raise ValueError(f"table has {num_buckets} buckets: too few for T5 bucketing (need >= {need})")
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must exceed the {max_exact} exact buckets that table's {num_buckets} rows give, "
            f"got {max_distance}"
        )


@functools.cache
def bucket_lut(num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """lut[d + max_distance] = bucket(d) for |d| <= max_distance, from the reference bucket function itself.

    Past |d| = max_distance a bucket no longer changes, so the kernels clamp d and look it up: their buckets are the
    reference's, bit for bit, with no float log of their own.
    """
    d = torch.arange(-max_distance, max_distance + 1)
    lut = ref.relative_position_bucket(d, bidirectional, num_buckets, max_distance).to(torch.int32)
    return lut.to(device)


def _as_2d(positions: torch.Tensor) -> torch.Tensor:
    return (positions if positions.dim() == 2 else positions[None]).to(torch.int64)


def _launch_args(positions: torch.Tensor, num_buckets: int, heads: int, max_distance: int, bidirectional: bool):
    pos = _as_2d(positions)
    lut = bucket_lut(num_buckets, max_distance, bidirectional, pos.device)
    return pos, dict(
        num_buckets=num_buckets, heads=heads, positions=pos.data_ptr(), pos_stride_b=pos.stride(0),
        pos_stride_t=pos.stride(1), batch=pos.shape[0], frames=pos.shape[1], lut=lut.data_ptr(),
        max_distance=max_distance, stream=_ext.stream_of(pos),
    )


def _out_shape(table: torch.Tensor, positions: torch.Tensor) -> tuple[int, ...]:
    T, H = positions.shape[-1], table.shape[1]
    return (H, T, T) if positions.dim() == 1 else (positions.shape[0], H, T, T)


@torch.library.custom_op("vdm_fast::rel_pos_bias", mutates_args=())
def _rel_pos_bias_op(
    table: torch.Tensor, positions: torch.Tensor, max_distance: int, bidirectional: bool, impl: str
) -> torch.Tensor:
    _dispatch.check_impl(SPEC, impl)
    out = torch.empty(_out_shape(table, positions), dtype=table.dtype, device=table.device)
    if out.numel() == 0:
        return out
    pos, args = _launch_args(positions, table.shape[0], table.shape[1], max_distance, bidirectional)
    with device_guard(table):
        _ext.module().rel_pos_bias_forward(
            device=table.device.type, table=table.data_ptr(), table_stride_k=table.stride(0),
            table_stride_h=table.stride(1), dtype=_ext.dtype_code(table.dtype), out=out.data_ptr(), **args,
        )
    return out


@_rel_pos_bias_op.register_fake
def _(table, positions, max_distance, bidirectional, impl):
    return table.new_empty(_out_shape(table, positions))


@torch.library.custom_op("vdm_fast::rel_pos_bias_backward", mutates_args=())
def _rel_pos_bias_backward_op(
    grad: torch.Tensor, positions: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool, impl: str
) -> torch.Tensor:
    _dispatch.check_impl(SPEC, impl)
    heads = grad.shape[-3]
    grad_table = torch.empty(num_buckets, heads, dtype=torch.float32, device=grad.device)
    g4 = grad if grad.dim() == 4 else grad[None]
    if g4.numel() == 0:
        return grad_table.zero_().to(grad.dtype)
    pos, args = _launch_args(positions, num_buckets, heads, max_distance, bidirectional)
    with device_guard(grad):
        _ext.module().rel_pos_bias_backward(
            device=grad.device.type, grad=g4.data_ptr(), grad_strides=list(g4.stride()),
            dtype=_ext.dtype_code(grad.dtype), grad_table=grad_table.data_ptr(), **args,
        )
    return grad_table.to(grad.dtype)


@_rel_pos_bias_backward_op.register_fake
def _(grad, positions, num_buckets, max_distance, bidirectional, impl):
    return grad.new_empty(num_buckets, grad.shape[-3])


def _setup_context(ctx, inputs, output):
    table, positions, max_distance, bidirectional, impl = inputs
    ctx.save_for_backward(positions)
    ctx.args = (table.shape[0], max_distance, bidirectional, impl)


def _backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return torch.ops.vdm_fast.rel_pos_bias_backward(grad, positions, *ctx.args), None, None, None, None


_rel_pos_bias_op.register_autograd(_backward, setup_context=_setup_context)

