"""Validation errors in words for the person who sent the request.

pydantic's messages speak of its own types ("Input should be a valid dictionary or instance of
MediaInput", "Value error, ..."); this maps each error type to a plain sentence, names a field as
the user wrote it (flat names in multipart forms), and points an unknown field at the one meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from common.schemas import GENERATION_FIELDS, SAMPLING_FIELDS, Generation, JobRequest, MediaInput, Sampling

# Where an unknown field inside a JSON body was found, and which fields belong there.
_NESTED: dict[str, type[BaseModel]] = {
    "videos": MediaInput,
    "images": MediaInput,
    "sampling": Sampling,
    "generation": Generation,
}

_SHAPES: dict[str, str] = {
    "MediaInput": 'must be an object such as {"url": "https://example.com/video.mp4"}',
}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_BY_TYPE: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "missing": lambda e: "is required",
    "model_type": lambda e: _SHAPES.get(str((e.get("ctx") or {}).get("class_name")), "must be an object"),
    "model_attributes_type": lambda e: "must be an object",
    "dict_type": lambda e: "must be an object",
    "list_type": lambda e: "must be a list",
    "string_type": lambda e: "must be text",
    "string_too_short": lambda e: (
        "must not be empty" if e["ctx"]["min_length"] == 1 else f"must be at least {e['ctx']['min_length']} characters"
    ),
    "string_too_long": lambda e: f"must be at most {e['ctx']['max_length']} characters",
    "int_type": lambda e: "must be a whole number",
    "int_parsing": lambda e: "must be a whole number",
    "int_from_float": lambda e: "must be a whole number",
    "float_type": lambda e: "must be a number",
    "float_parsing": lambda e: "must be a number",
    "finite_number": lambda e: "must be a finite number",
    "bool_type": lambda e: "must be true or false",
    "bool_parsing": lambda e: "must be true or false",
    "greater_than": lambda e: f"must be greater than {_number(e['ctx']['gt'])}",
    "greater_than_equal": lambda e: f"must be at least {_number(e['ctx']['ge'])}",
    "less_than": lambda e: f"must be less than {_number(e['ctx']['lt'])}",
    "less_than_equal": lambda e: f"must be at most {_number(e['ctx']['le'])}",
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}",
    "enum": lambda e: f"must be one of {e['ctx']['expected']}",
    "value_error": lambda e: str((e.get("ctx") or {}).get("error") or e["msg"]),
    "assertion_error": lambda e: str((e.get("ctx") or {}).get("error") or e["msg"]),
}


def plain_message(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence about the field, without pydantic's wording."""
    make = _BY_TYPE.get(error["type"])
    if make is not None:
        try:
            return make(error)
        except (KeyError, TypeError):
            pass
    message = str(error.get("msg", "is invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def unknown_field_message(name: str, allowed: Iterable[str], *, flat: bool = False) -> str:
    """ "unknown field", with the field probably meant: a close spelling, or where it belongs."""
    allowed = list(allowed)
    if not flat and name in SAMPLING_FIELDS and "sampling" in allowed:
        return f"unknown field; `{name}` belongs under `sampling`"
    if not flat and name in GENERATION_FIELDS and "generation" in allowed:
        return f"unknown field; `{name}` belongs under `generation`"
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    return f"unknown field; did you mean `{close[0]}`?" if close else "unknown field"


def _allowed_at(loc: Sequence[Any]) -> list[str]:
    names = [part for part in loc[:-1] if isinstance(part, str)]
    model = _NESTED.get(names[-1]) if names else JobRequest
    return list(model.model_fields) if model is not None else []


def field_name(loc: Sequence[Any], *, flat: bool = False) -> str:
    """``("sampling", "num_frames")`` as the user named it: ``sampling.num_frames`` in JSON,
    ``num_frames`` in a multipart form, where options are flat fields."""
    parts = [str(part) for part in loc]
    if flat and len(parts) == 2 and parts[0] in ("sampling", "generation"):
        return parts[1]
    if flat and len(parts) >= 2 and parts[0] == "webhook":
        return f"webhook_{parts[1]}"
    return ".".join(parts) or "body"


def validation_problems(exc: ValidationError, *, flat: bool = False) -> list[dict[str, str]]:
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and loc:
            message = unknown_field_message(str(loc[-1]), _allowed_at(loc))
        else:
            message = plain_message(error)
        problems.append({"field": field_name(loc, flat=flat), "message": message})
    return problems


def flat_problems(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    """Problems found after parsing, renamed to a multipart form's flat field names."""
    return [{**p, "field": field_name(p["field"].split("."), flat=True)} for p in problems]
