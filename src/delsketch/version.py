"""The package version (its own module, so that low layers can stamp files without importing the package)."""

__version__ = "0.1.0"
