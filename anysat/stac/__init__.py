"""STAC discovery: providers and searches by region and dates."""

from .providers import Provider, resolve_provider
from .search import search_items, search_sensors

__all__ = ["Provider", "resolve_provider", "search_items", "search_sensors"]
