"""Safe names for adapters and aliases, and parsing of a request's `model` reference.

A name is 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit and never
holding '..': it is safe as a path component, a URL segment and a metric label. '@' is excluded because
it separates a name from a version in `name@version`.
"""

import re
from dataclasses import dataclass

from server.registry.errors import InvalidNameError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")  # >= 1, and small enough for any integer column


@dataclass(frozen=True)
class ModelRef:
    """A parsed `model` string: a name (adapter or alias) and, for `name@version`, the version."""

    name: str
    version: int | None = None


def check_name(name: str, what: str = "adapter name") -> str:
    """Return `name` unchanged if it is safe; raise InvalidNameError saying why not."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..'"
        )
    return name


def adapter_key(name: str, version: int) -> str:
    """The key that names one adapter version everywhere (cache, engine): `name@version`."""
    return f"{name}@{version}"


def parse_model_ref(model: str) -> ModelRef:
    """Parse `name` or `name@version` (version an integer >= 1); raise InvalidNameError otherwise."""
    name, sep, version = model.partition("@")
    check_name(name, "model name")
    if not sep:
        return ModelRef(name)
    if not _VERSION.fullmatch(version):
        raise InvalidNameError(f"invalid version in {model!r}: expected name@N with N an integer >= 1")
    return ModelRef(name, int(version))
