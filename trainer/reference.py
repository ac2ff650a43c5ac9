"""A user's code named in a config as "package.module:attr": how Ray workers reach it.

A `register_*` call in the driver does not reach Ray workers (a registry is per process); an
import reference does, as long as the package is on the workers' Python path."""

from __future__ import annotations

import importlib
from typing import Any

from embshard.errors import ConfigError, first_line


def import_reference(reference: str, key: str) -> Any:
    """The object `reference` ("package.module:attr") names; ConfigError naming config `key`
    and whether the module or the attribute is missing."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {reference!r} is not package.module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({first_line(e)})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: cannot import {attr!r} from module {module_name!r} "
                          "(it has no such attribute)") from None
