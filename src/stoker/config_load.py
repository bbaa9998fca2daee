"""Loading recipes: YAML files, `--section.key=value` overrides, validation with one-line errors.

The schema is config.py's; this module turns text into it. A wrong key, type or value is a
`StokerError` whose message names the dotted key (and the nearest valid one), so the CLI exits
2 without a traceback.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from stoker.errors import StokerError, file_errors

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_override_value(text: str) -> Any:
    """`--a.b=VALUE`: lists/maps/null/bools via YAML; numbers (incl. `3e-4`) and strings as-is
    for pydantic to coerce against the field's type."""
    if text.strip().startswith(("[", "{")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            why = getattr(e, "problem", None) or str(e).splitlines()[0]  # YAML's are multi-line
            raise StokerError(f"cannot parse override value {text!r}: {why}") from None
    if text.lower() in ("null", "none", "~"):
        return None
    return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.max_steps=30", "--optim.lr", "3e-4"]` -> {"train.max_steps": "30", ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise StokerError(
                f"unexpected argument {arg!r}; overrides look like --section.key=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise StokerError(f"override --{key} has no value; write --{key}=VALUE")
            value, i = args[i + 1], i + 1
        out[key] = parse_override_value(value)
        i += 1
    return out


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        ann = next((a for a in get_args(ann) if a is not type(None)), ann)  # X | None -> X
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):  # e.g. `model: 5` in the recipe, or --model=5
            section = ".".join(parts[: i + 1])
            raise StokerError(f"cannot set {key}: {section} is {child!r}, not a section of keys")
        node = child
    node[parts[-1]] = value


def _format_error(err: ValidationError, schema: type[BaseModel], data: dict[str, Any]) -> str:
    e = err.errors()[0]
    # union members (`int | Literal["auto"]`, `NonNegativeInt | ...`) add their tags to the
    # location: leave them out
    tags = ("int", "bool", "float", "str")
    loc = [
        p
        for p in e["loc"]
        if not (isinstance(p, str) and (p in tags or p.startswith(("literal[", "constrained-"))))
    ]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if len(err.errors()) > 1 and all(
        x["loc"][: len(loc)] == e["loc"][: len(loc)] for x in err.errors()
    ):
        e = {**e, "msg": " or ".join(x["msg"] for x in err.errors())}
    if e["type"] == "extra_forbidden":
        section, fields = key.split(".")[0], getattr(schema, "model_fields", {})
        owners = _recipes_with_section(section) if section not in fields else []
        if owners and "recipe" in fields:
            name = schema.model_fields["recipe"].default
            return (
                f"unknown config key {key!r} for recipe {name}; it is a section of "
                f"recipe {' or '.join(owners)} (set recipe: {owners[0]})"
            )
        near = difflib.get_close_matches(key, valid_keys(schema), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"unknown config key {key!r}{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return f"invalid config: {msg}"
    if e["type"] == "value_error":  # our validators name their keys themselves
        return f"invalid config: {msg}"
    return f"invalid value for {key}: {e.get('input')!r} ({msg})"


def _recipes_with_section(section: str) -> list[str]:
    from stoker.config import RECIPES

    return [n for n, cls in RECIPES.items() if section in cls.model_fields]


def validate_config(data: dict[str, Any], schema: type[BaseModel] | None = None) -> Any:
    """`data` validated against `schema` (default: the recipe class its `recipe` key names)."""
    if schema is None:
        from stoker.config import recipe_class

        if isinstance(data, dict) and "mor" in data and data["mor"] is None:
            data = {k: v for k, v in data.items() if k != "mor"}  # how older runs saved "none"
        schema = recipe_class(data)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise StokerError(_format_error(err, schema, data)) from None


def load_config(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    schema: type[BaseModel] | None = None,
) -> Any:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise StokerError(f"recipe file not found: {p} (pass a path to a .yaml recipe)")
        with file_errors(p, "cannot read the recipe", "save it as UTF-8 YAML"):
            text = p.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            why = getattr(e, "problem", None) or str(e).splitlines()[0]  # a ReaderError has none
            raise StokerError(f"{p}{where}: not valid YAML ({why})") from None
        data = {} if data is None else data  # an empty file: the defaults
        if not isinstance(data, dict):
            raise StokerError(f"{p}: a recipe must be a YAML mapping of sections")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return validate_config(data, schema)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (printed at start, saved with every checkpoint)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
