"""The orchestration layer: config, the `edgeveil` command, the stages in order, the report."""

__all__ = ["config", "cli", "stages"]
