"""Request-body validation against the JSON Schemas in ``schemas/``.

Schemas are loaded and checked once; a failing body becomes an ``InvalidRequestError`` whose
``param`` is the JSON path of the problem (``messages[0].role``), worded as OpenAI words it.

Two libraries, one job each: fastjsonschema compiles draft-07 schemas to Python code and accepts a
valid body in ~2 us (jsonschema takes ~40 us, a tenth of a request's CPU); jsonschema then explains
a rejected body, with the error detail (path, keyword, best match) that fastjsonschema lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastjsonschema
import jsonschema

from .config import ConfigError, format_path
from .errors import InvalidRequestError

JSON_TYPES = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
              "number": "a number", "boolean": "a boolean", "null": "null"}
MAX_SHOWN_VALUE = 80  # characters of a bad value quoted back in an error message


def json_type(value) -> str:
    for name, kind in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                       ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kind):
            return JSON_TYPES[name]
    return type(value).__name__


class Schemas:
    """Compiled validators, by schema name (the file stem)."""

    def __init__(self, directory: Path):
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._fast: dict[str, object] = {}
        for file in sorted(directory.glob("*.json")):
            try:
                schema = json.loads(file.read_text(encoding="utf-8"))
                cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
                cls.check_schema(schema)
            except (ValueError, jsonschema.SchemaError) as exc:
                raise ConfigError(f"{file}: invalid JSON Schema: {exc}") from None
            self._validators[file.stem] = cls(schema)
            if cls is jsonschema.Draft7Validator:
                self._fast[file.stem] = fastjsonschema.compile(schema)

    def __contains__(self, name: str) -> bool:
        return name in self._validators

    def validate(self, name: str, body) -> None:
        fast = self._fast.get(name)
        if fast is not None:
            try:
                fast(body)
                return
            except fastjsonschema.JsonSchemaValueException as exc:
                rejected = exc
        else:
            rejected = None
        error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(body))
        if error is not None:
            raise describe(error)
        if rejected is not None:  # the two libraries disagree: trust the stricter one
            raise InvalidRequestError(f"Invalid request body: {rejected.message[:200]}", param="request_body")


def describe(error: jsonschema.ValidationError) -> InvalidRequestError:
    parts = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next(k for k in error.validator_value if k not in error.instance)
        param = format_path(parts + [missing])
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    param = format_path(parts) if parts else "request_body"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(JSON_TYPES.get(t, t) for t in ([expected] if isinstance(expected, str) else expected))
        return InvalidRequestError(
            f"Invalid type for '{param}': expected {expected}, but got {json_type(error.instance)} instead.",
            param=param)
    if error.validator == "minItems" and error.instance == []:
        return InvalidRequestError(f"Invalid '{param}': empty array. Expected an array with minimum length "
                                   f"{error.validator_value}, but got an empty array instead.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {short_message(error)}", param=param)


def short_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, with the offending value cut short: a huge value is named, not echoed."""
    shown = repr(error.instance)
    if len(shown) <= MAX_SHOWN_VALUE:
        return error.message
    return error.message.replace(shown, shown[:MAX_SHOWN_VALUE] + "...")
