"""Stage 1: data, split architectures, defenses and the trainer (torch and torchvision only)."""

__all__ = ["archs", "data", "defenses", "runfile", "trainer"]
