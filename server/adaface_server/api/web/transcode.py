"""JSON and multipart bodies <-> the API's protobuf messages (proto field names).

Beyond protobuf's own JSON mapping: an Embedding's `vector` is a JSON float array (base64 of
little-endian float32 is accepted, and returned with ?vector_format=base64); 64-bit counts are
JSON numbers; text parameters (query string, form fields) are converted by their field's type.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ...errors import InvalidArgument
from .routes import EMBEDDING

VECTOR_FORMATS = ("json", "base64")
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64)
_INTS = (*_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32)
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)  # protobuf >= 6.31; `label` is deprecated there
    return flag if flag is not None else f.label == FieldDescriptor.LABEL_REPEATED


# -- requests ------------------------------------------------------------------------------


def _pack_vector(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: expected a float array or base64 of float32")
    try:
        packed = np.asarray(value, dtype="<f4")
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: expected an array of numbers") from None
    if packed.ndim != 1:
        raise InvalidArgument(f"{where}: expected a flat array of numbers")
    return base64.b64encode(packed.tobytes()).decode()


def _pack_vectors(descriptor: Descriptor, data: dict, where: str) -> None:
    """Turns float arrays in Embedding messages into the packed bytes protobuf expects."""
    for key, value in data.items():
        f = descriptor.fields_by_name.get(key)
        if f is None or f.message_type is None or _is_map(f):
            continue
        items = value if repeated(f) and isinstance(value, list) else [value]
        for i, item in enumerate(items):
            path = f"{where}{key}[{i}]" if repeated(f) else f"{where}{key}"
            if f.message_type is EMBEDDING:
                if isinstance(item, (list, str)):  # shorthand: the vector alone
                    item = {"vector": item}
                    if repeated(f):
                        value[i] = item
                    else:
                        data[key] = item
                if isinstance(item, dict) and "vector" in item:
                    item["vector"] = _pack_vector(item["vector"], f"{path}.vector")
            elif isinstance(item, dict):
                _pack_vectors(f.message_type, item, f"{path}.")


def _text_value(f: FieldDescriptor, text: str, name: str) -> Any:
    try:
        if f.type == FieldDescriptor.TYPE_BOOL:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if f.type in _INTS:
            return int(text)
        if f.type in _FLOATS:
            return float(text)
        if f.message_type is not None:
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise InvalidArgument(f"{name}: cannot read {text!r} as its type") from None
    return text  # strings, bytes (base64) and enum names pass as they are


def set_text(descriptor: Descriptor, data: dict, name: str, text: str) -> None:
    """Sets `name` (dotted for nested fields, e.g. options.flip_fusion) from a text value."""
    parts = name.split(".")
    target = data
    for part in parts[:-1]:
        f = descriptor.fields_by_name.get(part)
        if f is None or f.message_type is None or repeated(f):
            raise InvalidArgument(f"{name}: no such field")
        target = target.setdefault(part, {})
        descriptor = f.message_type
    f = descriptor.fields_by_name.get(parts[-1])
    if f is None:
        raise InvalidArgument(f"{name}: no such field")
    value = _text_value(f, text, name)
    if repeated(f) and not _is_map(f) and not isinstance(value, list):
        target.setdefault(parts[-1], []).append(value)
    else:
        target[parts[-1]] = value


def parse(message_type: type[Message], data: dict) -> Message:
    """Builds the request message; errors name the field."""
    descriptor = message_type.DESCRIPTOR
    _pack_vectors(descriptor, data, "")
    message = message_type()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise InvalidArgument(str(exc)) from None
    return message


def parse_json(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"body: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body: must be a JSON object")
    return data


def add_file(message: Message, target: str, data: bytes, text: Mapping[str, str]) -> None:
    """Appends an uploaded file as an ImageInput at `target` (e.g. "samples.image")."""
    head, _, tail = target.partition(".")
    container = getattr(message, head)
    holder = container.add() if hasattr(container, "add") else container
    image = getattr(holder, tail) if tail else holder
    if not hasattr(holder, "add") and tail and holder.HasField(tail):
        raise InvalidArgument(f"{head}: given twice (as a file and in the body)")
    image.encoded = data
    if "alignment" in text:
        try:
            image.alignment = (
                type(image)
                .DESCRIPTOR.fields_by_name["alignment"]
                .enum_type.values_by_name[text["alignment"]]
                .number
            )
        except KeyError:
            raise InvalidArgument(f"alignment: unknown value {text['alignment']!r}") from None


def vector_format(value: str | None) -> str:
    if value is None or value == "":
        return "json"
    if value not in VECTOR_FORMATS:
        raise InvalidArgument(f"vector_format: must be json or base64, got {value!r}")
    return value


# -- responses -----------------------------------------------------------------------------


def _unpack(descriptor: Descriptor, data: dict, base64_vectors: bool) -> None:
    for key, value in data.items():
        f = descriptor.fields_by_name.get(key)
        if f is None:
            continue
        if f.type in _INT64:
            data[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif f.message_type is not None and not _is_map(f):
            for item in value if isinstance(value, list) else [value]:
                if f.message_type is EMBEDDING:
                    if not base64_vectors:
                        raw = base64.b64decode(item.get("vector", ""))
                        item["vector"] = np.frombuffer(raw, dtype="<f4").tolist()
                else:
                    _unpack(f.message_type, item, base64_vectors)


def to_json(message: Message, vectors: str = "json") -> dict:
    """The message as JSON data: proto field names, every field present, enums by name."""
    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    _unpack(message.DESCRIPTOR, data, vectors == "base64")
    return data
