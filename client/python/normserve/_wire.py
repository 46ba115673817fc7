"""Protobuf wire helpers that keep tensor bytes out of copies.

The Python protobuf runtime only takes ``bytes`` for a bytes field and hands
them back as a fresh copy, so sending a tensor through it would copy the data
twice (into ``bytes``, then into the serialized message) and reading one twice
more. Instead, requests are serialized without the tensor's ``data`` and the
field is appended by hand around the caller's buffer (one copy: the final
join), and the tensor's ``data`` is cut out of a response as a memoryview of
the received bytes before the rest is parsed.

Both rely only on the protobuf wire format: fields may appear in any order,
and a message field is ``tag, varint length, payload``. The field numbers
come from the generated descriptors (``length_field``), read once at import,
so that a change to normserve.proto changes them too, or fails the import.
"""

from google.protobuf import descriptor as _descriptor

from normserve.v1 import normserve_pb2 as _pb

_LEN = 2  # Wire type of length-delimited fields.


def length_field(message_type, name):
    """The number of ``message_type``'s field ``name``, which must be a
    singular message or bytes field (length-delimited on the wire)."""
    field = message_type.DESCRIPTOR.fields_by_name[name]
    if (field.label == _descriptor.FieldDescriptor.LABEL_REPEATED or
            field.type not in (_descriptor.FieldDescriptor.TYPE_MESSAGE,
                               _descriptor.FieldDescriptor.TYPE_BYTES)):
        raise TypeError(f"{field.full_name} is not a singular message or "
                        "bytes field: normserve's wire path cannot splice it")
    return field.number


TENSOR_DATA = length_field(_pb.Tensor, "data")  # Tensor.data

_PACKED_TYPES = {
    _descriptor.FieldDescriptor.TYPE_FLOAT: "<f4",
    _descriptor.FieldDescriptor.TYPE_DOUBLE: "<f8",
}


def packed_field(message_type, name):
    """(number, numpy dtype) of ``message_type``'s repeated float or double
    field ``name`` (packed on the wire, as proto3 writes it)."""
    field = message_type.DESCRIPTOR.fields_by_name[name]
    if (field.label != _descriptor.FieldDescriptor.LABEL_REPEATED or
            field.type not in _PACKED_TYPES):
        raise TypeError(f"{field.full_name} is not a repeated float or "
                        "double field")
    return field.number, _PACKED_TYPES[field.type]


def packed_bytes(field, array):
    """A packed repeated field ``field`` holding ``array`` (a contiguous
    little-endian numpy array of the field's type), serialized: what
    ``extend`` of a list builds, without a Python object per value."""
    data = array.tobytes()
    return _len_header(field, len(data)) + data if len(data) else b""


def packed_arrays(buf, fields):
    """Reads top-level packed repeated numeric fields out of a serialized
    message: ``fields`` maps (number, dtype) pairs (see packed_field) to
    names. Returns {name: numpy array (a writable copy)}; an absent field
    is an empty array. The protobuf runtime would convert every value to
    a Python float on the way to numpy; this reads the bytes as they are.
    """
    wanted = {number: (name, dtype) for (number, dtype), name in
              fields.items()}
    found = {name: [] for name in fields.values()}
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        field, wire_type, payload, pos = _next_field(buf, pos, end)
        if wire_type == _LEN and field in wanted:
            found[wanted[field][0]].append(view[payload:pos])
    import numpy as np  # Only the numeric paths need it.
    out = {}
    for number, (name, dtype) in wanted.items():
        pieces = found[name]
        raw = b"".join(pieces) if len(pieces) != 1 else pieces[0]
        out[name] = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    return out


def varint(value):
    """Returns ``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf, pos):
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _next_field(buf, pos, end):
    """The field at ``pos`` of a message ending at ``end``: (number, wire
    type, where its payload starts, where the next field starts)."""
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    payload = pos
    if wire_type == 0:
        _, pos = _read_varint(buf, pos)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    elif wire_type == _LEN:
        length, payload = _read_varint(buf, pos)
        pos = payload + length
    else:
        raise ValueError(f"unsupported protobuf wire type {wire_type}")
    if pos > end:
        raise ValueError("truncated protobuf message")
    return field, wire_type, payload, pos


def _len_header(field, length):
    return varint((field << 3) | _LEN) + varint(length)


class Parts:
    """A serialized message as a list of bytes-like pieces."""

    __slots__ = ("pieces", "size")

    def __init__(self, *pieces):
        self.pieces = []
        self.size = 0
        for piece in pieces:
            self.append(piece)

    def append(self, piece):
        self.pieces.append(piece)
        self.size += piece.nbytes if isinstance(piece, memoryview) else len(
            piece)

    def append_field(self, field, inner):
        """Appends ``inner`` (Parts) as message field number ``field``."""
        self.append(_len_header(field, inner.size))
        self.pieces.extend(inner.pieces)
        self.size += inner.size

    def join(self):
        return b"".join(self.pieces)


def message_with_tensor(message_bytes, field, tensor_meta_bytes, data):
    """Returns Parts: a message plus a Tensor at ``field`` holding ``data``.

    ``message_bytes`` is the message serialized without that field,
    ``tensor_meta_bytes`` the Tensor serialized without ``data``
    (TENSOR_DATA), ``data`` a contiguous byte buffer (bytes or a memoryview
    of format 'B').
    """
    tensor = Parts(tensor_meta_bytes)
    tensor.append(_len_header(TENSOR_DATA, _nbytes(data)))
    tensor.append(data)
    out = Parts(message_bytes)
    out.append_field(field, tensor)
    return out


def _nbytes(data):
    return data.nbytes if isinstance(data, memoryview) else len(data)


def split_data(buf, fields):
    """Cuts one bytes field out of a serialized message without copying it.

    ``fields`` names the bytes field by field numbers from the top-level
    message down, either as a tuple, e.g. ``(1, 4)`` for
    ForwardResponse.output.data, or as a tree of alternatives, e.g.
    ``{3: {1: {4: None}}, 4: {1: {4: None}}}`` (None marks the bytes field).
    Returns ``(rest, data)``: the message serialized without that field
    (enclosing lengths fixed), and a memoryview of ``buf`` holding the
    field's bytes (None when absent).
    """
    if isinstance(fields, tuple):
        tree = None
        for field in reversed(fields):
            tree = {field: tree}
        fields = tree
    return _split(buf, memoryview(buf), 0, len(buf), fields)


def _split(buf, view, start, end, tree):
    pieces = []
    data = None
    pos = start
    while pos < end:
        field_start = pos
        field, wire_type, payload, pos = _next_field(buf, pos, end)
        if wire_type == _LEN and field in tree:
            subtree = tree[field]
            if subtree is None:
                data = view[payload:pos]
                continue
            inner, inner_data = _split(buf, view, payload, pos, subtree)
            if inner_data is not None:
                data = inner_data
            pieces.append(_len_header(field, len(inner)))
            pieces.append(inner)
            continue
        pieces.append(buf[field_start:pos])
    if pos != end:
        raise ValueError("truncated protobuf message")
    return b"".join(pieces), data
