"""No defense: the plain split model. Goes through every hook and adds nothing."""
from __future__ import annotations

from .base import Defense


class NoDefense(Defense):
    name = "none"
    description = "no defense: the plain split model, the baseline every defense is measured against"

    def __init__(self, strength: float = 0.0, **options):
        super().__init__(strength, **options)
        if self.strength != 0.0:
            raise ValueError(f"defense.strength must be 0 for defense 'none', got {strength}")
