"""Command-line flags generated from `Settings`, so the CLI cannot drift from the settings.

Each field becomes `--field-name`, typed from its annotation: `Literal` → choices, `bool` →
`--x/--no-x`, `list[str]` → a repeatable flag, anything else → checked against the field's own type and
constraints while parsing (`--max-loras 0` or `--kv-cache-memory 2XB` exit with status 2). The help line
is the field's description, its default and its environment variable. A flag not given leaves no
attribute (`argparse.SUPPRESS`), so `settings_from_args` passes only the given flags and the
precedence is flag > LORASERVE_* environment variable > default.

Plain argparse rather than pydantic-settings' CLI source: loraserve's subcommands mix settings with
options of their own (`generate --prompt`, `keys create --role`) and with a dataclass (`build-demo`),
`keys` takes two settings only, and the existing spelling is a contract: that source splits list values
at commas (a PATH may hold one) and hands bad values to pydantic after parsing, instead of an
argparse error that names the flag.
"""

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import ByteSize, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from server.config import Settings

_BINARY_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_METAVARS = {int: "N", float: "NUM", ByteSize: "BYTES", Path: "PATH"}  # str: the flag's name


def _name_equals_path(text: str) -> str:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return text


# Items of list settings that need more than a string, with their metavar.
_ITEM_TYPES: dict[str, tuple[Callable[[str], str], str]] = {"lora": (_name_equals_path, "NAME=PATH")}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return Settings.model_config["env_prefix"] + name.upper()


def render_default(name: str) -> str:
    """A field's default as --help and README write it: 512MiB, on, unset."""
    value = Settings.model_fields[name].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, ByteSize):
        return next((f"{value // size}{unit}" for unit, size in _BINARY_UNITS if value and value % size == 0),
                    str(int(value)))
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def _base_type(annotation: Any) -> Any:
    """`X | None` → X."""
    if get_origin(annotation) in (Union, UnionType):
        [annotation] = [arg for arg in get_args(annotation) if arg is not NoneType]
    return annotation


def _validated(name: str, kind: Any, field: FieldInfo) -> Callable[[str], Any]:
    adapter = TypeAdapter(Annotated[kind, field])  # the field's constraints (ge=1) apply too

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg']}, got {text!r}") from None

    parse.__name__ = name
    return parse


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    """`add_argument` keywords for one field."""
    help_text = f"{field.description} Default: {render_default(name)}. Env: {env_var(name)}."
    common = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    kind = _base_type(field.annotation)
    if get_origin(kind) is Literal:
        return {**common, "choices": get_args(kind)}
    if kind is bool:
        return {**common, "action": argparse.BooleanOptionalAction}
    if get_origin(kind) is list:
        item_type, metavar = _ITEM_TYPES.get(name, (str, None))
        return {**common, "action": "append", "type": item_type, "metavar": metavar}
    return {**common, "type": _validated(name, kind, field), "metavar": _METAVARS.get(kind)}


def add_settings_flags(parser: argparse.ArgumentParser,
                       names: Iterable[str] = tuple(Settings.model_fields)) -> None:
    """One flag per named field (all of them by default), in a group of their own."""
    group = parser.add_argument_group("settings", "flag > environment variable > default")
    for name in names:
        group.add_argument(flag(name), **_argument(name, Settings.model_fields[name]))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given; the others come from the environment or the defaults."""
    return Settings(**{name: value for name, value in vars(args).items() if name in Settings.model_fields})
