"""A user's code named in a config as "package.module:attr": how Ray workers reach it.

A `register_*` call in the driver does not reach Ray workers (a registry is per process); an
import reference does, as long as the package is on the workers' Python path."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embshard.errors import ConfigError, EmbshardError, first_line


def import_reference(reference: str, key: str) -> Any:
    """The object `reference` ("package.module:attr") names; ConfigError naming config `key`
    and whether the module or the attribute is missing."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {reference!r} is not package.module:attr")
    _note_users_package(module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = e.name or ""
        if missing and not (module_name == missing or module_name.startswith(missing + ".")):
            # The module was found and failed as it ran: something it imports is missing.
            raise ConfigError(f"{key}: importing module {module_name!r} failed: {first_line(e)}"
                              f"{raised_at(e)}") from None
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({first_line(e)})") from None
    except (Exception, SystemExit) as e:  # the user's module failed (or exited) as it ran: where, in one line
        where = "" if isinstance(e, SyntaxError) else raised_at(e)
        raise ConfigError(f"{key}: importing module {module_name!r} failed: {first_line(e)}{where}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: cannot import {attr!r} from module {module_name!r} "
                          "(it has no such attribute)") from None


def instance_of(found: Any, key: str) -> Any:
    """`found`, or an instance of it when it is a class: made with no arguments, since a config
    names a class but cannot pass it any."""
    if not isinstance(found, type):
        return found
    if not callable_as(found, 0):
        raise ConfigError(f"{key}: {call_text(found)} needs arguments, and a class a config names is made with "
                          "none (name an instance to configure one)")
    try:
        return found()
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{key}: {found.__name__}() raised {first_line(e)}{raised_at(e)}") from None


def colon_hint(name: str) -> str:
    """`; did you mean 'a.b:c'?` for a reference written with a dot where its colon goes."""
    module, dot, attr = name.rpartition(".")
    return f"; did you mean {module + ':' + attr!r}?" if dot and module and attr and ":" not in name else ""


@contextmanager
def users_code(what: str, *, refusals_too: bool = False) -> Iterator[None]:
    """A hook of a method or arch failing in its own code: one ConfigError naming `what` and where
    (an EmbshardError it raises says its own one line already; with `refusals_too`, for a hook
    whose values embshard then checks, it keeps its kind and words after `what`: `dim: must be
    positive` of a config the hook built read as the config's own `embeddings.dim`)."""
    try:
        yield
    except EmbshardError as e:
        if refusals_too:
            raise type(e)(f"{what}: {e}") from None
        raise
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{what} raised {first_line(e)}{raised_at(e)}") from None


def raised_at(e: BaseException) -> str:
    """` at file:line` of the innermost frame `e` passed through in a user's code (else its
    innermost frame): where to look."""
    frames = [(f.filename, f.lineno or 0) for f in traceback.extract_tb(e.__traceback__)]
    return users_frame(frames) or (f" at {frames[-1][0]}:{frames[-1][1]}" if frames else "")


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)', re.MULTILINE)


def raised_at_in(traceback_text: str) -> str:
    """`raised_at` of a traceback as text (a Ray worker's, which reaches the driver as text), or
    "" where no frame of it is a user's."""
    return users_frame([(m["file"], int(m["line"])) for m in _FRAME.finditer(traceback_text)])


def users_frame(frames: list[tuple[str, int]]) -> str:
    """` at file:line` of the innermost of `frames` (outermost first) that is a user's: in a
    package a config named (`import_reference`), installed or not, or else not Python's own
    library, an installed package's or in a folder of embshard's modules as this process loaded
    them; "" where there is none. Not named: where a worker's embshard lives at another path than
    the driver's."""
    ours = _ours()
    for file, line in reversed(frames):
        path = Path(file)
        named = any(path.is_relative_to(p) for p in _USERS_PACKAGES)
        if named or (not file.startswith("<") and not any(path.is_relative_to(r) for r in _LIBRARIES)
                     and path.parent not in ours):
            return f" at {file}:{line}"
    return ""


# Python's own library and installed packages (torch, TorchRec, Ray): frames there are nobody's to fix.
_LIBRARIES = {Path(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}


# Where the top-level packages (or modules) of the references this process imported live: a
# user's code even when pip installed it among the libraries.
_USERS_PACKAGES: set[Path] = set()


def _note_users_package(module_name: str) -> None:
    top, *inner = module_name.split(".")
    # A built-in named by reference is no user's code, nor a library the process had loaded
    # before any config was read (torch, numpy, ray): `torch.nn:Linear` does not make torch yours.
    if top == "embshard" or top in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finds it without running it
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    if spec.submodule_search_locations is None:
        _USERS_PACKAGES.update([Path(spec.origin)] if spec.origin and spec.has_location else [])
        return
    # A namespace package spans several distributions: only the one that holds the module.
    folders = [Path(p) for p in spec.submodule_search_locations]
    holding = [f for f in folders if inner and ((f / inner[0]).is_dir() or (f / f"{inner[0]}.py").is_file())]
    _USERS_PACKAGES.update(holding or folders)


def _ours() -> set[Path]:
    """The folders embshard's own modules live in (its layers are folders of their own)."""
    files = (getattr(m, "__file__", None) for name, m in list(sys.modules.items())
             if name == "embshard" or name.startswith("embshard."))
    return {Path(f).parent for f in files if f}


def call_text(fn: Any) -> str:
    """`name(a, b)`: how `fn` is called, without the annotations a message has no room for."""
    return f"{getattr(fn, '__name__', type(fn).__name__)}({', '.join(inspect.signature(fn).parameters)})"


def callable_as(fn: Any, positional: int) -> bool:
    """Whether `fn` takes `positional` arguments: checked on the driver, before a call in every
    worker would fail once Ray had started. True where there is no signature to read (the call
    will say)."""
    try:
        inspect.signature(fn).bind(*[None] * positional)
    except TypeError:
        return False
    except ValueError:
        return True
    return True
