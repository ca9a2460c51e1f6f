"""Configuration problems in an operator's words: the setting, where it came from, what is wrong.

pydantic says "Value should have at least 16 items after validation" or "Extra
inputs are not permitted"; an operator needs the setting, the `LLMSVC_*`
variable or the file it came from, and what it accepts. A value is never
echoed: it may be a key.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

PREFIX = "LLMSVC_"


class Sources:
    """Where each setting came from: an `LLMSVC_*` variable (they win) or the TOML file."""

    def __init__(self, environ: Mapping[str, str], config_file: str | None) -> None:
        # pydantic-settings matches variable names regardless of case
        self.variables = {name.upper(): name for name in environ if name.upper().startswith(PREFIX)}
        self.environ = environ
        self.config_file = config_file

    def variable(self, setting: str) -> str | None:
        """The variable as it was written (any case), if one sets `setting`."""
        return self.variables.get(PREFIX + setting.upper())

    def of(self, setting: str) -> str:
        """` (from LLMSVC_X)`, ` (in FILE)`, or nothing for a value given in code."""
        variable = self.variable(setting)
        if variable is not None:
            return f" (from {variable})"
        return f" (in {self.config_file})" if self.config_file else ""


def unknown_variables(
    sources: Sources, settings: Iterable[str], others: Iterable[str], others_prefix: str
) -> list[str]:
    """An `LLMSVC_*` variable that is no setting, each with the closest setting's variable.

    A misspelt one would otherwise be ignored and its default used in its place
    (`LLMSVC_DATABASE` would boot on a local SQLite file). `others` are llmsvc's
    variables that are not settings, `others_prefix` a family of them.
    """
    names = sorted(settings)
    known = {PREFIX + name.upper() for name in names} | set(others)
    problems = []
    for upper, written in sorted(sources.variables.items()):
        if upper in known or upper.startswith(others_prefix):
            continue
        close = difflib.get_close_matches(upper.removeprefix(PREFIX).lower(), names, n=1)
        hint = (
            f"did you mean {PREFIX}{close[0].upper()}?"
            if close
            else "README.md's Configuration lists them"
        )
        problems.append(f"{written} is not a setting ({hint})")
    return problems


def unparsable_variables(sources: Sources, model: type[BaseModel]) -> list[str]:
    """Variables of list or table settings (`LLMSVC_PROVIDERS`) that are not JSON."""
    problems = []
    for name, info in model.model_fields.items():
        origin = typing.get_origin(info.annotation)
        kind = "list" if origin is list else "object" if origin is dict else None
        variable = sources.variable(name)
        if kind is None or variable is None:
            continue
        try:
            json.loads(sources.environ[variable])
        except json.JSONDecodeError as exc:  # its message says where, never what
            problems.append(
                f"{name} (from {variable}): not valid JSON ({exc.msg} at line {exc.lineno} "
                f"column {exc.colno}): it takes a JSON {kind}"
            )
    return problems


def describe(err: ErrorDetails, model: type[BaseModel], sources: Sources) -> str:
    """One validation error as `setting (source): what is wrong: what it takes`."""
    loc = err["loc"]
    if not loc:  # a check across settings (ours): its message starts with the setting
        message = err["msg"].removeprefix("Value error, ")
        name, sep, rest = message.partition(": ")
        top = name.split(".")[0]
        return f"{name}{sources.of(top)}: {rest}" if sep and top in model.model_fields else message
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    owner, info = _field_at(model, loc)
    return f"{where.lstrip('.')}{sources.of(str(loc[0]))}: {_what_is_wrong(err, owner, info)}"


def _what_is_wrong(err: ErrorDetails, owner: type[BaseModel] | None, info: FieldInfo | None) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    accepted = _range(info) if info is not None else ""
    if kind == "extra_forbidden":
        names = list(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
        return "not a setting" + (f" (did you mean {close[0]}?)" if close else "")
    if kind == "missing":
        return "missing: it is required"
    if kind in ("string_too_short", "too_short"):
        return f"too short: it needs at least {_count(ctx['min_length'], ctx)}"
    if kind in ("string_too_long", "too_long"):
        return f"too long: it takes at most {_count(ctx['max_length'], ctx)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"out of range: it takes {accepted or _range_of(ctx)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "not a whole number: it takes a whole number" + (f", {accepted}" if accepted else "")
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "not a number: it takes a number" + (f", {accepted}" if accepted else "")
    if kind in ("bool_parsing", "bool_type"):
        return "not true or false: it takes true or false"
    if kind == "literal_error":
        return f"not one of its choices: it takes {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return f"not allowed: it must match {ctx['pattern']}"
    if kind == "string_type":
        return "of the wrong type: it takes text"
    if kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
        shape = "a list" if kind == "list_type" else "a table"
        return f"of the wrong type: it takes {shape} (in a variable, as JSON)"
    message = err["msg"].removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[Any, FieldInfo | None]:
    """The model whose field `loc` ends at, and that field (None for a key it does not have).

    List indexes and table keys (`providers[0]`, `prices.gpt-4o`) step into the item type.
    """
    annotation: Any = model
    owner: Any = None
    info: FieldInfo | None = None
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            owner, info = annotation, annotation.model_fields.get(str(part))
            if info is None:
                return owner, None
            annotation = info.annotation
        else:
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
            info = None
    return owner, info


def _range(info: FieldInfo) -> str:
    """What a number setting takes, from its bounds: `1 to 64`, `more than 0`."""
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(item, name)
    return _range_of(bounds)


def _range_of(bounds: Mapping[str, Any]) -> str:
    ge, gt, le, lt = (bounds.get(name) for name in ("ge", "gt", "le", "lt"))
    if ge is not None and le is not None:
        return f"{_number(ge)} to {_number(le)}"
    parts = []
    if ge is not None:
        parts.append(f"{_number(ge)} or more")
    if gt is not None:
        parts.append(f"more than {_number(gt)}")
    if le is not None:
        parts.append(f"at most {_number(le)}")
    if lt is not None:
        parts.append(f"less than {_number(lt)}")
    return " and ".join(parts)


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _count(n: int, ctx: Mapping[str, Any]) -> str:
    """`16 characters`, or `1 entry` for a list or table (pydantic says `items` for both)."""
    if ctx.get("field_type") in ("List", "Dictionary"):
        return f"{n} {'entry' if n == 1 else 'entries'}"
    return f"{n} character{'' if n == 1 else 's'}"
