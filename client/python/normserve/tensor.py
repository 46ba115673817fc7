"""Tensors on the wire: numpy arrays to and from normserve.v1.Tensor.

A tensor travels as raw little-endian bytes with its logical shape
``(N, C, *spatial)``, a dtype (float32, float16, bfloat16) and a layout:
``NCHW`` (C-contiguous) or ``NHWC`` (channels last: the bytes are ordered
``(N, *spatial, C)``, like PyTorch's ``channels_last`` memory format).

:class:`WireTensor` is that description over a byte buffer, without a copy.
:func:`from_numpy` makes one from an array (a channels-last array, e.g.
``np.moveaxis(nhwc, -1, 1)``, goes as NHWC without a copy);
:func:`to_numpy` gives the array back as a view of the received bytes (read
only; bfloat16 comes back as float32 unless asked for the raw bits).
"""

from typing import NamedTuple, Tuple

import numpy as np

from normserve.v1 import normserve_pb2 as pb

__all__ = ["WireTensor", "from_numpy", "to_numpy", "dtype_enum", "dtype_name",
           "layout_enum", "layout_name", "memory_shape",
           "float32_to_bfloat16_bits", "bfloat16_bits_to_float32"]

_DTYPE_BY_NAME = {
    "float32": pb.DTYPE_FLOAT32, "float": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16, "half": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
_DTYPE_NAME = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16",
               pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_INT64: "int64",
               pb.DTYPE_UNSPECIFIED: "unspecified"}
_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
_LAYOUT_BY_NAME = {"nchw": pb.LAYOUT_NCHW, "contiguous": pb.LAYOUT_NCHW,
                   "nhwc": pb.LAYOUT_NHWC, "channels_last": pb.LAYOUT_NHWC}
_LAYOUT_NAME = {pb.LAYOUT_NCHW: "NCHW", pb.LAYOUT_NHWC: "NHWC",
                pb.LAYOUT_UNSPECIFIED: "unspecified"}


def dtype_enum(value):
    """Returns the pb.DType for a name ('float32', 'bfloat16', ...), a numpy
    dtype, or a pb.DType value. None gives DTYPE_UNSPECIFIED."""
    if value is None:
        return pb.DTYPE_UNSPECIFIED
    if isinstance(value, str):
        try:
            return _DTYPE_BY_NAME[value.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {value!r}; expected float32, "
                             "float16 or bfloat16") from None
    if isinstance(value, int) and value in _DTYPE_NAME:
        return value
    try:
        np_dtype = np.dtype(value)
    except TypeError:
        raise ValueError(f"unknown dtype {value!r}; expected float32, float16 "
                         "or bfloat16") from None
    if np_dtype == np.float32:
        return pb.DTYPE_FLOAT32
    if np_dtype == np.float16:
        return pb.DTYPE_FLOAT16
    raise ValueError(f"dtype {np_dtype} is not a wire dtype; expected float32, "
                     "float16 or bfloat16")


def dtype_name(value):
    return _DTYPE_NAME.get(value, str(value))


def layout_enum(value):
    """Returns the pb.Layout for 'NCHW'/'NHWC' ('channels_last') or a
    pb.Layout value. None gives LAYOUT_UNSPECIFIED."""
    if value is None:
        return pb.LAYOUT_UNSPECIFIED
    if isinstance(value, str):
        try:
            return _LAYOUT_BY_NAME[value.lower()]
        except KeyError:
            raise ValueError(f"unknown layout {value!r}; expected NCHW or "
                             "NHWC") from None
    if isinstance(value, int) and value in _LAYOUT_NAME:
        return value
    raise ValueError(f"unknown layout {value!r}; expected NCHW or NHWC")


def layout_name(value):
    return _LAYOUT_NAME.get(value, str(value))


def memory_shape(shape, layout):
    """Returns the shape of the bytes in memory order."""
    shape = tuple(shape)
    if layout == pb.LAYOUT_NHWC and len(shape) >= 3:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


class WireTensor(NamedTuple):
    """A tensor as it travels: logical shape, pb.DType, pb.Layout, bytes.

    ``data`` is any contiguous byte buffer (bytes, or a memoryview of format
    'B') holding ``prod(shape) * itemsize`` bytes in the layout's order.
    """

    shape: Tuple[int, ...]
    dtype: int
    layout: int
    data: object

    def meta(self):
        """Returns a pb.Tensor with everything but the data."""
        return pb.Tensor(shape=self.shape, dtype=self.dtype,
                         layout=self.layout)

    def to_proto(self):
        """Returns a full pb.Tensor (copies the data)."""
        return pb.Tensor(shape=self.shape, dtype=self.dtype,
                         layout=self.layout, data=bytes(self.data))

    @classmethod
    def from_proto(cls, tensor, data=None):
        """Wraps a pb.Tensor; ``data`` overrides its (copied) bytes."""
        return cls(tuple(tensor.shape), tensor.dtype, tensor.layout,
                   tensor.data if data is None else data)


def float32_to_bfloat16_bits(array):
    """Rounds float32 values to bfloat16 (nearest even), as uint16 bits."""
    array = np.asarray(array, dtype=np.float32)
    bits = array.view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits):
    """Widens bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(
        np.float32)


def _byte_view(array):
    if array.size == 0:
        return b""
    return memoryview(array).cast("B")


def from_numpy(array, dtype=None, layout=None):
    """Returns a WireTensor over ``array`` (logical shape ``(N, C, ...)``).

    dtype: None keeps float32/float16 (other numbers go as float32);
      'bfloat16' rounds floats to bfloat16, or takes uint16 as raw bits.
    layout: None sends a channels-last array as NHWC and anything else as
      NCHW, copying only when the array is neither; 'NCHW'/'NHWC' force one.
    """
    array = np.asarray(array)
    wire_dtype = dtype_enum(dtype)
    if wire_dtype == pb.DTYPE_UNSPECIFIED:
        wire_dtype = (pb.DTYPE_FLOAT16 if array.dtype == np.float16
                      else pb.DTYPE_FLOAT32)
    if wire_dtype == pb.DTYPE_BFLOAT16:
        if array.dtype != np.uint16:
            array = float32_to_bfloat16_bits(array.astype(np.float32,
                                                          copy=False))
    elif wire_dtype == pb.DTYPE_FLOAT16:
        array = array.astype(np.float16, order="K", copy=False)
    elif wire_dtype == pb.DTYPE_FLOAT32:
        array = array.astype(np.float32, order="K", copy=False)
    else:
        raise ValueError(f"dtype {dtype_name(wire_dtype)} cannot carry "
                         "activations; expected float32, float16 or bfloat16")
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)

    wire_layout = layout_enum(layout)
    if wire_layout == pb.LAYOUT_UNSPECIFIED:
        if (array.ndim >= 3 and not array.flags.c_contiguous
                and np.moveaxis(array, 1, -1).flags.c_contiguous):
            wire_layout = pb.LAYOUT_NHWC
        else:
            wire_layout = pb.LAYOUT_NCHW
    if wire_layout == pb.LAYOUT_NHWC and array.ndim >= 3:
        memory = np.ascontiguousarray(np.moveaxis(array, 1, -1))
    else:
        memory = np.ascontiguousarray(array)
    return WireTensor(tuple(int(d) for d in array.shape), wire_dtype,
                      wire_layout, _byte_view(memory))


def to_numpy(wire, bfloat16="float32"):
    """Returns the array a WireTensor holds, in logical shape (N, C, ...).

    The result is a read-only view of ``wire.data`` whose strides follow the
    layout (an NHWC tensor gives a channels-last view). bfloat16 is widened
    to float32 (a copy), or, with ``bfloat16='raw'``, returned as uint16 bits.
    """
    if wire.dtype == pb.DTYPE_FLOAT32:
        np_dtype = np.dtype("<f4")
    elif wire.dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        np_dtype = np.dtype("<f2" if wire.dtype == pb.DTYPE_FLOAT16 else "<u2")
    else:
        raise ValueError(f"cannot read a {dtype_name(wire.dtype)} tensor")
    array = np.frombuffer(wire.data, dtype=np_dtype).reshape(
        memory_shape(wire.shape, wire.layout))
    if wire.dtype == pb.DTYPE_BFLOAT16 and bfloat16 != "raw":
        array = bfloat16_bits_to_float32(array)
    if wire.layout == pb.LAYOUT_NHWC and len(wire.shape) >= 3:
        array = np.moveaxis(array, -1, 1)
    return array
