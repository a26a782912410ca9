"""The package version, in a file of its own so that setup.cfg reads it without importing TensorFlow."""

__version__ = "0.1.0"
