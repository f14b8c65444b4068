"""Stage 4: the cloud server that completes inference and, as the adversary, attacks the features it received."""

__all__ = ["server", "store"]
