"""Board profiles: the data in boards.yaml, validated once on load.

    board = get_board("stm32h743")
    board.arena_limit_bytes        # 524288: the largest RAM block the TFLite Micro arena can use
    names()                        # [(name, description), ...] for `edgeveil list boards`

Every problem in the file is reported at once, each naming the board and the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .estimate import ENGINES

__all__ = ["Board", "BOARDS_FILE", "load_boards", "get_board", "names"]

BOARDS_FILE = Path(__file__).with_name("boards.yaml")
KINDS = ("mcu", "linux")


@dataclass(frozen=True)
class Board:
    """One board. Sizes in bytes, clock in Hz; `flash_bytes` None means card storage (no limit)."""

    name: str
    description: str
    kind: str
    core: str
    cores: int
    clock_hz: int
    ram_bytes: int
    flash_bytes: int | None
    accelerator: str
    estimator: str
    runtime: str
    source: str
    largest_contiguous_ram_bytes: int | None = None
    vela_accelerator: str | None = None
    install: str | None = None
    notes: str | None = None

    @property
    def arena_limit_bytes(self) -> int:
        """The most RAM one TFLite Micro arena can take: the largest contiguous block, else all RAM."""
        return self.largest_contiguous_ram_bytes or self.ram_bytes

    @property
    def is_mcu(self) -> bool:
        return self.kind == "mcu"


_FIELDS = {f.name: f for f in dataclasses.fields(Board)}
_REQUIRED = [n for n, f in _FIELDS.items() if f.default is dataclasses.MISSING and n not in ("name", "flash_bytes")]
_INTS = ("cores", "clock_hz", "ram_bytes", "flash_bytes", "largest_contiguous_ram_bytes")


def load_boards(path: Path = BOARDS_FILE) -> dict[str, Board]:
    """Read and validate a boards file; ValueError listing every problem (file, board, field)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read board profiles ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of board name -> profile, got {type(raw).__name__}")
    problems, boards = [], {}
    for name, entry in raw.items():
        found = _problems(name, entry)
        problems += [f"board {name!r}: {p}" for p in found]
        if not found:
            boards[name] = Board(name=name, **entry)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return boards


def _problems(name, entry) -> list[str]:
    if not isinstance(name, str) or not name or not name.replace("-", "").isalnum() or name != name.lower():
        return [f"the name must be lowercase letters, digits and '-', got {name!r}"]
    if not isinstance(entry, dict):
        return [f"must be a mapping of fields, got {type(entry).__name__}"]
    problems = [f"unknown field {k!r} (known: {', '.join(n for n in _FIELDS if n != 'name')})"
                for k in entry if k not in _FIELDS or k == "name"]
    problems += [f"field {k} is missing" for k in _REQUIRED if k not in entry]
    problems += _value_problems(entry)
    return problems


def _value_problems(e: dict) -> list[str]:
    problems = []
    for k in _INTS:
        v = e.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            problems.append(f"field {k} must be a positive integer (bytes or Hz), got {v!r}")
    for k in ("description", "core", "accelerator", "estimator", "runtime", "source"):
        if k in e and (not isinstance(e[k], str) or not e[k].strip()):
            problems.append(f"field {k} must be a non-empty string, got {e[k]!r}")
    if problems:
        return problems
    if e.get("kind") not in KINDS:
        problems.append(f"field kind must be one of {', '.join(KINDS)}, got {e.get('kind')!r}")
    if "estimator" in e and e["estimator"] not in ENGINES:
        problems.append(f"field estimator must be one of {', '.join(ENGINES)}, got {e['estimator']!r}")
    limit = e.get("largest_contiguous_ram_bytes")
    if limit is not None and isinstance(e.get("ram_bytes"), int) and limit > e["ram_bytes"]:
        problems.append(f"field largest_contiguous_ram_bytes ({limit}) exceeds ram_bytes ({e['ram_bytes']})")
    if e.get("kind") == "mcu" and e.get("flash_bytes") is None:
        problems.append("field flash_bytes is required for an mcu board (null only for card storage)")
    if e.get("kind") == "linux" and not e.get("install"):
        problems.append("field install (the device runtime's install line) is required for a linux board")
    if str(e.get("accelerator", "")).startswith("Ethos-U") and not e.get("vela_accelerator"):
        problems.append("field vela_accelerator is required with an Ethos-U accelerator (e.g. ethos-u55-128)")
    return problems


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Board]:
    return load_boards(BOARDS_FILE)


def get_board(name: str) -> Board:
    """The shipped profile called `name`; ValueError listing the known names otherwise."""
    boards = _shipped()
    if name not in boards:
        raise ValueError(f"unknown board {name!r}; known boards: {', '.join(boards)} (edgeveil list boards)")
    return boards[name]


def names() -> list[tuple[str, str]]:
    """(name, description) of every shipped board, in file order."""
    return [(b.name, b.description) for b in _shipped().values()]
