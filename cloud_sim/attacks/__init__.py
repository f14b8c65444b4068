"""Attacks on received features: one file each, registered by name (they land with issues #3 and #5)."""

__all__: list[str] = []
