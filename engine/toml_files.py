"""Reading the integrators' and operators' TOML files with errors that say where and why.

>>> raw = read_toml(path, ConfigError, "configuration file")
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["describe_validation_error", "read_toml"]


def read_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """The parsed file; `error` names the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(f"{path}: no such {what}") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from e


def describe_validation_error(e: ValidationError, path: Path) -> str:
    """One line per problem: `file: key[0].sub: what was expected (got ...)`."""
    lines = []
    for err in e.errors():
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        lines.append(f"{path}: {key or '(file)'}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
