"""The ``edgeveil`` command. Subcommands import their stage lazily, so ``--help`` is instant."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]

_NOT_YET = {
    "demo": "the one-command demo (train, export, bench, serve, attack, report) lands with the device/cloud issue",
    "run": "running every stage from one config lands with the device/cloud issue",
    "bench": "the device benchmark lands with the device/cloud issue",
    "serve": "the cloud service lands with the device/cloud issue",
    "attack": "the attacks land with the device/cloud issue",
    "report": "the report lands with the device/cloud issue",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (optional: defaults apply)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--data-root", help="local folder holding torchvision datasets (same as --set data.root=DIR)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeveil", description="Private split inference on edge devices.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a split model into a new run directory")
    _add_config_args(t)
    t.add_argument("--out", type=Path, required=True, help="run directory")

    e = sub.add_parser("export", help="export the trained head to ONNX and TFLite, with parity checks")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--target", help="board profile for flashable files and a fit report")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("what", choices=["defenses", "attacks", "datasets", "archs", "boards"])

    d = sub.add_parser("demo", help="the embedded default end to end")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    r = sub.add_parser("run", help="every stage for one config")
    _add_config_args(r)
    r.add_argument("--out", type=Path, required=True)
    for name in ("bench", "serve", "attack", "report"):
        q = sub.add_parser(name, help=_NOT_YET[name].split(" lands")[0])
        q.add_argument("run_dir", type=Path)
        q.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _overrides(args) -> list[str]:
    extra = [f"data.root={args.data_root}"] if getattr(args, "data_root", None) else []
    return [*args.overrides, *extra]


def _cmd_train(args) -> int:
    from .config import load_config
    from .stages import train_stage

    cfg = load_config(args.config, _overrides(args))
    metrics = train_stage(cfg, args.out, progress=not args.no_progress)
    print(f"trained {args.out}: float test accuracy {metrics['float_test_accuracy']:.4f} "
          f"({metrics['epochs']} epochs, {metrics['train_seconds']:.1f} s)")
    return 0


def _cmd_export(args) -> int:
    from .config import from_dict, merge_dicts, parse_overrides
    from .stages import export_stage, read_run_config

    cfg = read_run_config(args.run_dir)
    if args.overrides:
        cfg = from_dict(merge_dicts(cfg.to_dict(), parse_overrides(args.overrides)))
    if args.target:
        print(f"--target {args.target}: flashable files and fit reports land with the MCU/ARM targets issue",
              file=sys.stderr)
        return 2
    manifest = export_stage(cfg, args.run_dir, progress=not args.no_progress)
    _print_export_table(manifest)
    print(f"wrote {args.run_dir / 'export' / 'manifest.json'}")
    return 0


def _print_export_table(manifest: dict) -> None:
    rows = [("artifact", "bytes", "tail acc", "cosine", "mean steps", "max steps", "max steps unsat.")]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for a in manifest["artifacts"].values():
        p = a["parity"]
        rows.append((a["file"], f"{a['bytes']:,}", f"{a['tail_accuracy']:.4f}", f"{p['cosine']:.6f}",
                     fmt(p.get("mean_err_steps"), ".2f"), fmt(p.get("max_err_steps"), ".2f"),
                     fmt(p.get("max_err_steps_unsaturated"), ".2f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    first = next(iter(manifest["artifacts"].values()))
    print(f"float (PyTorch) test accuracy: {first['float_accuracy']:.4f}; "
          f"onnx2tf took {manifest['converter']['seconds']:.1f} s")


def _cmd_list(args) -> int:
    if args.what == "defenses":
        from edgeveil.training.defenses import names
        rows = [(n, f"{d} [{p}]" if p != "-" else d) for n, d, p in names()]
    elif args.what == "archs":
        from edgeveil.training.archs import names
        rows = names()
    elif args.what == "datasets":
        from edgeveil.training.data import DATASETS
        rows = list(DATASETS.items())
    else:
        print(f"no {args.what} are registered yet: {args.what} land with a later issue", file=sys.stderr)
        return 0
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _cmd_train, "export": _cmd_export, "list": _cmd_list}
    if args.command not in handlers:
        print(f"edgeveil {args.command}: not there yet: {_NOT_YET[args.command]}", file=sys.stderr)
        return 2
    from .config import ConfigError

    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"edgeveil {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgeveil {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # ExportError and other wrapped third-party failures
        print(f"edgeveil {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
