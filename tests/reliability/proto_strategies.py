"""Hypothesis strategies for protobuf messages, built from their descriptors alone.

Every field of a message gets a strategy from its type: boundary values, plausible
small values (so that a fair share of requests is valid and runs) and the type's full
range, for scalars; short lists and now and then long ones, for repeated fields;
the same recursively for sub-messages and well-known types. Wire-level strategies
turn messages into bytes and damage them.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
MAX_DEPTH = 4


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, high, -1, 0, 1, 2, 15, 16, 17, 255, 256, 257, 258, 1023, 1024, 65536]
    return st.one_of(
        st.integers(0, 300),
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(low, high),
    )


FLOAT_EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1.175e-38,  # the smallest normal float32
    1e-45,  # the smallest subnormal
    1e-5,
    0.99999994,
    1.00000012,
    3.4028235e38,
    float("inf"),
    float("-inf"),
    float("nan"),
]

SHORT_TEXT = st.text(max_size=12)
TEXT = st.one_of(
    SHORT_TEXT,
    SHORT_TEXT,
    st.sampled_from(["", "user", "system", "assistant", "\n", "Once upon a time"]),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),  # a job id's shape
    st.integers(0, 20_000).map(lambda n: "x" * n),  # long ids, prompts, stop strings
)


def _scalar(field: FD) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_INT32:
        return _integers(*INT32)
    if kind == FD.TYPE_INT64:
        return _integers(*INT64)
    if kind == FD.TYPE_UINT32:
        return _integers(0, 2**32 - 1)
    if kind == FD.TYPE_UINT64:
        return _integers(0, 2**64 - 1)
    if kind == FD.TYPE_FLOAT:
        return st.one_of(
            st.floats(0.0, 1.5, width=32), st.sampled_from(FLOAT_EDGES), st.floats(width=32)
        )
    if kind == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return TEXT
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, max(known) + 3))
    raise TypeError(f"no strategy for {field.full_name} of type {kind}")


def _repeated(field: FD, depth: int) -> st.SearchStrategy[list[Any]]:
    element = _value(field, depth)
    lists = st.lists(element, max_size=8)
    if field.message_type is None:
        # Now and then a long list: thousands of token ids, stop ids, stop strings.
        lists = st.one_of(
            lists, st.tuples(element, st.integers(8, 3000)).map(lambda vn: [vn[0]] * vn[1])
        )
    return lists


def _value(field: FD, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def messages(message_type: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `message_type` with any subset of its fields set, at any value."""
    cls = message_factory.GetMessageClass(message_type)
    if depth > MAX_DEPTH:
        return st.just(cls())
    if message_type.full_name == "google.protobuf.Timestamp":
        return _timestamps(cls)
    fields = {
        field.name: st.deferred(
            lambda f=field: _repeated(f, depth) if f.is_repeated else _value(f, depth)
        )
        for field in message_type.fields
    }
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: build(cls, values))


def _timestamps(cls: type[Message]) -> st.SearchStrategy[Message]:
    now_s = 1_800_000_000
    seconds = st.one_of(
        st.integers(now_s - 86_400, now_s + 10 * 86_400),
        st.sampled_from([-62_135_596_801, -62_135_596_800, 253_402_300_799, 253_402_300_800]),
        st.integers(*INT64),
    )
    nanos = st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 10**9]), _integers(*INT32))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            getattr(message, name).extend(value)
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


@st.composite
def damaged(draw: st.DrawFn, message_type: descriptor.Descriptor) -> bytes:
    """A message's wire bytes, truncated, flipped, spliced with noise, or plain noise."""
    data = draw(messages(message_type)).SerializeToString()
    how = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "noise", "append"]))
    if how == "noise" or not data:
        return draw(st.binary(min_size=1, max_size=256))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if how == "delete":
        return data[:at] + data[at + draw(st.integers(1, 16)) :]
    return data + draw(st.binary(min_size=1, max_size=16))
