"""The export stage's error type."""

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """The head cannot be exported or converted; the message names the file, op or field at fault."""
