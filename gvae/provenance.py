"""What code and packages produced a result: recorded beside every trial and every reproduction,
so a number can be traced to its code. Imports neither torch nor Ray."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("gvae", "torch", "ray", "optuna")


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of gvae's checkout, None when it is not one (an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, Any]:
    """The `<package>_version`, `python_version` and `git_commit` columns of a trial's row."""
    versions = {f"{name}_version": installed_version(name) for name in PACKAGES}
    return {**versions, "python_version": platform.python_version(), "git_commit": git_commit()}
