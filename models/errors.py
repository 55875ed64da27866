"""Errors for a model that cannot be found or loaded, each a `ValueError` with a one-line message.

The CLI prints the message and exits; nothing here should surface as a traceback from deep
inside numpy, safetensors or gguf.
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """The model named on the command line cannot be found or loaded."""


class ModelPathError(ModelLoadError):
    """The model name or path points at nothing this engine can load."""


class CheckpointError(ModelLoadError):
    """A Hugging Face checkpoint directory is incomplete or holds a broken file."""


class CheckpointFileMissingError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not there (also a `FileNotFoundError`, as it used to be)."""


class GGUFError(ModelLoadError):
    """A GGUF file is unreadable, truncated, or holds something this engine cannot convert."""
