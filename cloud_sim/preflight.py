"""Before anything trains: does every attack fit the run's data?

Each attack states what it needs through `Attack.fit_to(sizes, given)`; here those answers are
gathered into a plan. An attack whose defaults do not fit small data runs with scaled-down
options (the plan says which); one that cannot run is skipped with a named reason; invalid
options are refused at once, all of them in one error.

    split_sizes(splits, num_classes)           -> {"targets", "aux", "labelled", "classes", ...}
    attack_plan(names, options, sizes)         -> {name: Planned}
    describe_plan(plan)                        -> lines for the user
"""
from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Planned", "split_sizes", "attack_plan", "describe_plan"]


class Planned(NamedTuple):
    attack: Any               # the Attack instance to run (options scaled when needed)
    scaled: dict[str, list]   # option -> [default, scaled value]
    skip: str | None          # why it cannot run on this data, or None


def split_sizes(splits, num_classes: int) -> dict[str, int]:
    """The sizes attacks are fitted to; every test image is a target."""
    return {"targets": len(splits.test), "aux": len(splits.aux), "labelled": len(splits.labelled),
            "victim_train": len(splits.victim_train), "classes": int(num_classes),
            "evaluator": 0 if splits.evaluator is None else len(splits.evaluator)}


def attack_plan(names: list[str], options: dict, sizes: dict[str, int]) -> dict[str, Planned]:
    """Fit every named attack to the data; a ValueError lists every invalid name or option."""
    from .attacks import create

    plan, problems = {}, []
    for name in names:
        given = dict(options.get(name, {}))
        try:
            attack = create(name, **given)
        except ValueError as e:
            problems.append(str(e))
            continue
        changes, skip = attack.fit_to(sizes, set(given))
        scaled = {k: [attack.options[k], v] for k, v in changes.items()}
        if changes and skip is None:
            attack = create(name, **given, **changes)
        plan[name] = Planned(attack, scaled, skip)
    if problems:
        raise ValueError("; ".join(problems))
    return plan


def describe_plan(plan: dict[str, Planned]) -> list[str]:
    """One line per attack that does not run as configured."""
    lines = []
    for name, p in plan.items():
        if p.skip:
            lines.append(f"{name} is skipped: {p.skip}")
        elif p.scaled:
            lines.append(f"{name} runs with options scaled to the data: "
                         + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in p.scaled.items()))
    return lines
