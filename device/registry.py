"""A registry: an explicit dict of name -> "package.module:attr" you can grep, imported lazily.

Defenses, attacks and archs each keep one, in their package's `__init__`:

    DEFENSES = Registry("defense", "defense.name", "Class", {"none": "edgeveil.training.defenses.none:NoDefense"})
    DEFENSES.load("none")          # the class (imports its module only now)
    DEFENSES.load("nosuch")        # ValueError: defense.name must be one of none, got 'nosuch'

What a component is, it says once, in its `description` attribute: a class in its own class
attribute, a function (an arch's builder) in its module's, beside the module's other declarations.
`describe(name)` reads it there; nothing else stores it. Standard library only: every stage may
import this, and looking a name up imports nothing heavy until `load`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["Registry"]


class Registry(dict):
    """name -> "package.module:attr". A plain dict (iterate, `in`, len), plus checked register and load.

    kind: what one entry is, for messages ("defense"). field: the config field an unknown name came
    from ("defense.name"). attr: what the part after ':' names ("Class", "builder").
    """

    def __init__(self, kind: str, field: str, attr: str, targets: dict[str, str]):
        super().__init__()
        self.kind, self.field, self.attr = kind, field, attr
        for name, target in targets.items():
            self.register(name, target)

    def __reduce__(self):  # copy and pickle rebuild it through __init__, checks included
        return type(self), (self.kind, self.field, self.attr, dict(self))

    def register(self, name: str, target: str) -> None:
        """Add `name`; a taken name or a target not shaped 'package.module:attr' is refused."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered (to {self[name]})")
        module, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
        if not (module and sep and attr):
            raise ValueError(f"{self.kind} target must look like 'package.module:{self.attr}', got {target!r}")
        self[name] = target

    def check(self, name: str, field: str | None = None) -> str:
        """`name` if it is registered; otherwise a ValueError naming the field and every known name."""
        if name not in self:
            raise ValueError(f"{field or self.field} must be one of {', '.join(self)}, got {name!r}")
        return name

    def module(self, name: str, field: str | None = None) -> ModuleType:
        """The module that defines `name`'s target (imported now)."""
        return importlib.import_module(self[self.check(name, field)].partition(":")[0])

    def load(self, name: str, field: str | None = None) -> Any:
        """The class or function `name` is registered to (its module is imported now)."""
        return getattr(self.module(name, field), self[name].partition(":")[2])

    def describe(self, name: str) -> str:
        """The one-line description, from the `description` attribute of the class (or a function's module)."""
        target = self.load(name)
        holder = target if isinstance(target, type) else self.module(name)
        description = getattr(holder, "description", "")
        if not isinstance(description, str) or not description.strip() or "\n" in description:
            raise ValueError(f"{self.kind} {name!r}: {holder.__name__}.description must be one non-empty line, "
                             f"got {description!r}")
        return description
