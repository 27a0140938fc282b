"""Locate the catalogs/ folder: packaged in a wheel, or beside the package in a checkout."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def catalogs_dir() -> Path:
    for candidate in (_PACKAGE / "_catalogs", _PACKAGE.parent / "catalogs"):
        if (candidate / "providers.yaml").exists():
            return candidate
    raise FileNotFoundError("catalogs/ not found beside the anysat package nor inside it")
