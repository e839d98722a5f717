"""The OpenAPI 3.1 document of the HTTP API, derived from the route table and the protobuf
messages themselves, so it cannot drift from what the handlers parse and return."""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ... import __version__
from .routes import EMBEDDING, ROUTES, Route
from .transcode import repeated

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": "integer"},
    FieldDescriptor.TYPE_UINT64: {"type": "integer", "minimum": 0},
}
_VECTOR = {
    "description": "little-endian float32 values: a JSON number array, or base64 "
    "(requests accept both; responses use base64 with ?vector_format=base64)",
    "oneOf": [
        {"type": "array", "items": {"type": "number"}},
        {"type": "string", "contentEncoding": "base64"},
    ],
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "gRPC status name"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
            },
        },
        "details": {"type": "object", "description": "per-image results when every image failed"},
    },
}
_ERRORS = {
    "400": "INVALID_ARGUMENT or FAILED_PRECONDITION: the message names the field",
    "401": "UNAUTHENTICATED: missing or unknown bearer token",
    "403": "PERMISSION_DENIED: gallery writes need an admin token",
    "404": "NOT_FOUND: unknown gallery or identity",
    "409": "ALREADY_EXISTS",
    "429": "RESOURCE_EXHAUSTED: the queue is full",
    "503": "UNAVAILABLE: the model is not loaded yet",
    "504": "DEADLINE_EXCEEDED: x-request-timeout passed before the work was done",
}


def _field_schema(f: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value = f.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _field_schema(value, schemas)}
    if f.enum_type is not None:
        one: dict[str, Any] = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
    elif f.message_type is not None:
        one = {"$ref": "#/components/schemas/" + _message(f.message_type, schemas)}
    else:
        one = dict(_SCALARS[f.type])
    if repeated(f):
        return {"type": "array", "items": one}
    return one


def _message(descriptor: Descriptor, schemas: dict[str, Any]) -> str:
    name = descriptor.name
    if name in schemas:
        return name
    schemas[name] = {}  # placeholder: messages may refer to themselves
    properties = {}
    for f in descriptor.fields:
        if descriptor is EMBEDDING and f.name == "vector":
            properties[f.name] = dict(_VECTOR)
        else:
            properties[f.name] = _field_schema(f, schemas)
    schemas[name] = {"type": "object", "properties": properties}
    return name


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = []
    for name in _path_names(route.path):
        params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    fields = route.request.DESCRIPTOR.fields_by_name
    for name in route.query:
        schema = _field_schema(fields[name], {})
        params.append({"name": name, "in": "query", "required": False, "schema": schema})
    params.append(
        {
            "name": "vector_format",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["json", "base64"], "default": "json"},
        }
    )
    params.append(
        {
            "name": "x-request-id",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "echoed on the answer; made up when missing",
        }
    )
    params.append(
        {
            "name": "x-request-timeout",
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "seconds the caller waits; work still queued then is dropped (504)",
        }
    )
    return params


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    request = _message(route.request.DESCRIPTOR, schemas)
    response = _message(route.response.DESCRIPTOR, schemas)
    op: dict[str, Any] = {
        "operationId": f"{route.service}.{route.rpc}",
        "summary": route.summary,
        "description": f"The {route.service}.{route.rpc} RPC over HTTP; path parameters "
        "fill the request fields of the same name.",
        "parameters": _parameters(route),
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}
                },
            },
            **{
                code: {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for code, text in _ERRORS.items()
            },
        },
    }
    if route.body:
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
        }
        if route.files:
            form = {
                name: {"type": "array", "items": {"type": "string", "format": "binary"}}
                for name in route.files
            }
            form["json"] = {"type": "string", "description": "the JSON body, less the files"}
            form["alignment"] = {
                "type": "string",
                "description": "Alignment enum name for the uploaded files",
            }
            content["multipart/form-data"] = {
                "schema": {"type": "object", "properties": form, "additionalProperties": True}
            }
        op["requestBody"] = {"required": False, "content": content}
    if route.admin:
        op["description"] += " With admin tokens configured, needs one."
    return op


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once; it depends only on code)."""
    schemas: dict[str, Any] = {"Error": ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.verb.lower()] = _operation(route, schemas)
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "SERVING once the model is loaded and warmed up (no token needed).",
            "responses": {
                "200": {"description": "serving"},
                "503": {"description": "not serving yet"},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "adaface-serving HTTP API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
