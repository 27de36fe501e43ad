"""``relay-idem proxy --config FILE``: the proxy's flags, and its routes, from a TOML file (SPEC §8.1).

Top-level keys are the proxy's flags in snake_case (``upstream``, ``redis``, ``ttl``,
``require_key = [...]``, ...); each ``[[route]]`` table has ``path`` and any ``RoutePolicy`` field.
A value is checked as its flag's value is (the same click type), but its TOML type must be the
flag's own: a number for a number, a list of strings for a repeatable or list flag, a boolean for
an on/off flag. A flag or its environment variable beats the file; the file beats the default.

Any problem is one line naming the file and the key, and exit status 2 (a usage error).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import click
from click.core import ParameterSource

from relay_idem.routes import ROUTE_FIELDS, ROUTE_OPTIONS, RoutePolicy

# Route options a file can set: every one but those that take a Python callable.
FILE_ROUTE_KEYS = frozenset({"path", *ROUTE_FIELDS, *ROUTE_OPTIONS} - {"final_status"})
# Route fields named after a repeatable flag of another spelling.
ROUTE_FLAG_NAMES = {"fingerprint_headers": "fingerprint_header", "replay_exclude_headers": "replay_exclude_header"}
NUMBER_TYPES = (click.types.FloatParamType, click.types.IntParamType)


class ConfigFileError(click.ClickException):
    """The config file cannot be used: one line naming the file and the key; exit status 2."""

    exit_code = 2


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None


def _type_name(value: object) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "a table", int: "an integer"}.get(
        type(value), type(value).__name__
    )


def convert(path: str, key: str, param: click.Parameter, value: object, ctx: click.Context) -> Any:
    """``value`` from the file as ``param`` would take it from the command line, or :class:`ConfigFileError`."""
    expected: str | None = None
    if isinstance(param, click.Option) and param.is_flag:
        expected = None if isinstance(value, bool) else "true or false"
    elif param.multiple or param.type.name == "LIST":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            expected = "a list of strings"
        else:
            return tuple(value)
    elif isinstance(param.type, NUMBER_TYPES):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or (isinstance(param.type, click.types.IntParamType) and not isinstance(value, int)):
            expected = "an integer" if isinstance(param.type, click.types.IntParamType) else "a number"
    elif param.type.name == "BYTES":
        expected = None if isinstance(value, int | str) and not isinstance(value, bool) else "bytes (1048576 or '1MiB')"
    elif not isinstance(value, str):
        expected = "a string"
    if expected is not None:
        raise ConfigFileError(f"{path}: {key} must be {expected}, not {_type_name(value)} {value!r}")
    if isinstance(param, click.Option) and param.is_flag:
        return value
    try:
        return param.type.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise ConfigFileError(f"{path}: {key}: {exc.message}") from None


def route_table(
    path: str, index: int, table: object, params: Mapping[str, click.Parameter], ctx: click.Context
) -> dict[str, Any]:
    """One ``[[route]]`` table, its values converted and checked by :class:`RoutePolicy`."""
    where = f"route[{index}]"
    if not isinstance(table, dict):
        raise ConfigFileError(f"{path}: {where} must be a table ([[route]]), not {_type_name(table)}")
    if "path" not in table:
        raise ConfigFileError(f"{path}: {where} has no path")
    route: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{where}.{name}"
        if name not in FILE_ROUTE_KEYS:
            raise ConfigFileError(f"{path}: unknown key {key} (a route takes {', '.join(sorted(FILE_ROUTE_KEYS))})")
        if name in ("enabled", "require_key"):
            if not isinstance(value, bool):
                raise ConfigFileError(f"{path}: {key} must be true or false, not {_type_name(value)} {value!r}")
            route[name] = value
        elif name in ("path", "key"):
            if not isinstance(value, str):
                raise ConfigFileError(f"{path}: {key} must be a string, not {_type_name(value)} {value!r}")
            route[name] = value
        elif (param := params.get(ROUTE_FLAG_NAMES.get(str(name), str(name)))) is not None:
            converted = convert(path, key, param, value, ctx)
            route[name] = list(converted) if isinstance(converted, tuple) else converted
        else:  # an option without a flag of its own: RoutePolicy checks it
            route[name] = value
    try:
        RoutePolicy.from_table(route)
    except ValueError as exc:
        raise ConfigFileError(f"{path}: {where}: {exc}") from None
    return route


def apply(ctx: click.Context, path: str, kwargs: dict[str, Any]) -> None:
    """Fill ``kwargs`` from the file at ``path`` wherever neither a flag nor a variable set a value."""
    params = {param.name: param for param in ctx.command.params if param.name is not None}
    for name, value in read(path).items():
        if name == "route":
            if not isinstance(value, list):
                raise ConfigFileError(f"{path}: route must be an array of tables ([[route]]), not {_type_name(value)}")
            kwargs["routes"] = tuple(route_table(path, index, table, params, ctx) for index, table in enumerate(value))
            continue
        param = params.get(name)
        if param is None or name == "config":
            raise ConfigFileError(
                f"{path}: unknown key {name!r} (keys are the proxy's flags in snake_case, and [[route]])"
            )
        converted = convert(path, name, param, value, ctx)
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
            kwargs[name] = converted
