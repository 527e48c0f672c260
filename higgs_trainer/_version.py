"""The package version, in a file of its own so setup.cfg reads it without importing torch (``attr:``)."""

__version__ = "0.1.0"
