"""The ``edgeveil`` command. Subcommands import their stage lazily, so ``--help`` is instant."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (optional: defaults apply)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--data-root", help="local folder holding torchvision datasets (same as --set data.root=DIR)")


# The defended models `edgeveil demo` runs beside the undefended one: (defense, strength, what it shows).
# Chosen by measuring candidates on the demo's data and budget (benchmarks/demo_candidates.py).
# Measured (benchmarks/results/demo_candidates.json): noise 1.5 cuts inverse SSIM from 0.981 to 0.918
# on float and int8 alike; noise 0.005 is 0.2 of an int8 output step, erased on the device.
DEMO_DEFENSES = (("noise", 1.5, "noise of many int8 steps: protects in float and still on the device"),
                 ("noise", 0.005, "noise of 0.2 int8 output steps: rounding on the device erases it"))
# The demo's budget: the precisions a board runs, attacked on float and int8.
DEMO_OVERRIDES = ["export.precisions=[fp32,int8]", "attack.precisions=[float,int8]"]


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
    e.add_argument("--memory-plan", default="tflm", metavar="{tflm,offline}",
                   help="with an MCU --target: 'offline' plans the TFLite Micro arena here and writes "
                        "head_int8_planned.tflite and its C array (default 'tflm': TFLM plans on the board)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("what", choices=["defenses", "attacks", "datasets", "archs", "boards"])

    d = sub.add_parser("demo", help="the embedded default end to end (digits, small CNN), undefended and defended")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="sweep directory (default runs/demo)")
    d.add_argument("--defense", default=None,
                   help="one defense to run beside the undefended model instead of the demo's two "
                        + " and ".join(f"({n} {s:g}: {w})" for n, s, w in DEMO_DEFENSES) + "; 'none' runs no defense")
    d.add_argument("--strength", type=float, default=None, help="its strength (default: the defense's example)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run")
    r = sub.add_parser("run", help="every stage for one config")
    _add_config_args(r)
    r.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("bench", help="device benchmark of every exported artifact")
    b.add_argument("run_dir", type=Path)
    b.add_argument("--runs", type=int, default=200, help="timed runs per setting")
    sv = sub.add_parser("serve", help="the cloud service for a run (loopback by default)")
    sv.add_argument("run_dir", type=Path)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    sv.add_argument("--store-cap", type=int, default=10_000, metavar="N",
                    help="keep at most N frames in cloud/features (default 10000); once full, frames are refused "
                         "with 503 and Retry-After, never answered without being kept")
    sv.add_argument("--replay-tolerance", type=float, default=300.0, metavar="SECONDS",
                    help="refuse frames whose timestamp is further than this from the server's clock (default 300)")
    sv.add_argument("--retry-window", type=float, default=60.0, metavar="SECONDS",
                    help="the same frame resent within this of its first arrival is a retry (200, duplicate), "
                         "later a replay (409) (default 60)")
    a = sub.add_parser("attack", help="attacks on the features the cloud received")
    a.add_argument("run_dir", type=Path)
    a.add_argument("--attacks", help="comma-separated attack names (default: the config's attack.names)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rp = sub.add_parser("report", help="report.md and report.html for a run, or for a folder of runs (a sweep, with trade-off plots)")
    rp.add_argument("run_dir", type=Path)
    sw = sub.add_parser("sweep", help="a grid of runs as Ray tasks: a local Ray by default, a cluster given --address")
    sw.add_argument("--config", type=Path, required=True, help="sweep file (grid, base config, stages)")
    sw.add_argument("--out", type=Path, required=True, help="sweep folder: one run directory per cell")
    sw.add_argument("--address", help="a running Ray cluster (host:port); default: start a local Ray and stop it")
    sw.add_argument("--max-parallel", type=int, help="at most this many cells at once (default: what the CPUs allow)")
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
    from edgeveil.export.memplan import check_memory_plan

    from .stages import export_stage

    check_memory_plan(args.memory_plan)  # bad flags fail before the run directory is read
    if args.target is not None:
        from edgeveil.export.targets import check_plan_target

        check_plan_target(args.memory_plan, args.target)
    cfg = _run_config(args)
    manifest = export_stage(cfg, args.run_dir, progress=not args.no_progress, target=args.target,
                            memory_plan=args.memory_plan)
    _print_export_table(manifest)
    if "targets" in manifest:
        from edgeveil.export.targets import format_target_summary

        print(format_target_summary(manifest["targets"]))
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


def _run_config(args):
    from .config import from_dict, merge_dicts, parse_overrides
    from .stages import read_run_config

    cfg = read_run_config(args.run_dir)
    overrides = getattr(args, "overrides", None)
    return from_dict(merge_dicts(cfg.to_dict(), parse_overrides(overrides))) if overrides else cfg


def _cmd_demo(args) -> int:
    """The undefended digits model and defended ones beside it, each end to end, then the sweep report."""
    from edgeveil.cloud_sim.verdict import outcome_word

    from .config import load_config
    from .run_all import run_all
    from .sweep import write_sweep_report

    progress = not args.no_progress
    if args.defense is None:
        defended = [(n, s) for n, s, _ in DEMO_DEFENSES]
    elif args.defense == "none":
        defended = []
    else:  # an unknown name fails before the first run
        defended = [(args.defense, args.strength if args.strength is not None
                     else _demo_defense(args.defense).example_strength)]
    overrides = [*DEMO_OVERRIDES, *args.overrides]
    load_config(None, overrides)  # a bad --set fails before the first run
    verdicts = {"none": run_all(load_config(None, overrides), args.out / "none", progress=progress,
                                bench_runs=50)["attacks"]["verdict"]}
    for name, strength in defended:
        cfg = load_config(None, [*overrides, f"defense.name={name}", f"defense.strength={strength}",
                                 f"attack.baseline={args.out / 'none'}"])
        label = f"{name} {strength:g}"
        verdicts[label] = run_all(cfg, args.out / f"{name}_{strength:g}", progress=progress,
                                  bench_runs=50)["attacks"]["verdict"]
    md, html = write_sweep_report(args.out)
    for label, v in verdicts.items():
        print(f"{label:>14}: {outcome_word(v)}")
    print(f"wrote {html} (and {md.name}); each run has its own report.html")
    return 0


def _demo_defense(name: str):
    from edgeveil.training.defenses import load

    return load(name, field="--defense")


def _cmd_run(args) -> int:
    from .config import load_config
    from .run_all import run_all

    run_all(load_config(args.config, _overrides(args)), args.out, progress=not args.no_progress)
    return 0


def _cmd_bench(args) -> int:
    from edgeveil.device.bench import format_table

    from .device_stage import bench_stage

    result = bench_stage(args.run_dir, runs=args.runs, progress=not args.no_progress)
    print(format_table(result["results"]))
    for s in result["skipped"]:
        print(f"skipped {s['precision']} threads={s['threads']} xnnpack={s['xnnpack_requested']}: {s['reason']}")
    print(f"wrote {args.run_dir / 'device' / 'bench.json'}")
    return 0


def _cmd_serve(args) -> int:
    from edgeveil.cloud_sim.server import serve_forever

    serve_forever(args.run_dir, host=args.host, port=args.port, allow_remote=args.allow_remote,
                  store_cap=args.store_cap, replay_tolerance=args.replay_tolerance,
                  retry_window=args.retry_window)
    return 0


def _cmd_attack(args) -> int:
    from .attack_stage import attack_stage

    names = args.attacks.split(",") if args.attacks else None
    out = attack_stage(_run_config(args), args.run_dir, names, progress=not args.no_progress)
    for name, a in out["attacks"].items():
        for prec, r in a["precisions"].items():
            if r["summary"]:
                if "identification" in r["summary"]:
                    s = r["summary"]["identification"]
                    print(f"{name:10s} {prec:6s} identified {s['mean']:.4f}")
                metric, s = next(iter(r["summary"].items()))  # the attack's headline metric comes first
                print(f"{name:10s} {prec:6s} {metric} {s['mean']:.4f} (95% CI {s['ci95'][0]:.4f}-{s['ci95'][1]:.4f})")
    from edgeveil.cloud_sim.verdict import outcome_word

    v = out["verdict"]
    print(f"verdict: {outcome_word(v)}: {v['headline']}")
    print(f"wrote {args.run_dir / 'cloud' / 'attacks.json'}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report
    from .sweep import find_runs, write_sweep_report

    folder = Path(args.run_dir)
    if not (folder / "config.yaml").is_file() and folder.is_dir() and find_runs(folder):
        for run in find_runs(folder):  # a sweep: each run's own report, then the one over all of them
            write_report(run)
        md, html = write_sweep_report(folder)
    else:
        md, html = write_report(folder)
    print(f"wrote {md} and {html}")
    return 0


def _cmd_sweep(args) -> int:
    from .ray_sweep import run_sweep

    record = run_sweep(args.config, args.out, address=args.address, max_parallel=args.max_parallel,
                       progress=not args.no_progress)
    from edgeveil.cloud_sim.verdict import outcome_word

    for name, state in record["cells_state"].items():
        verdict = _read_verdict(args.out / name)
        what = state.get("error") if state["status"] == "failed" else outcome_word(verdict) if verdict else state["status"]
        print(f"{name}: {state['status']}: {what}")
    print(f"wrote {args.out / 'report.html'} and {args.out / 'sweep.json'} ({record['seconds']:.0f} s, "
          f"{record['parallel']} cells at a time, Ray {record['address']})")
    if record["failed"]:
        print(f"edgeveil sweep: {len(record['failed'])} cell(s) failed: {', '.join(record['failed'])}", file=sys.stderr)
        return 1
    return 0


def _read_verdict(run_dir: Path) -> dict | None:
    import json

    path = run_dir / "cloud" / "attacks.json"
    return json.loads(path.read_text()).get("verdict") if path.is_file() else None


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
    elif args.what == "attacks":
        from edgeveil.cloud_sim.attacks import create, names
        rows = [(n, f"{d} [{p}; threat model: {create(n).threat_model.describe()}]") for n, d, p in names()]
    else:
        from edgeveil.export.boards import names
        rows = names()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _cmd_train, "export": _cmd_export, "list": _cmd_list, "demo": _cmd_demo,
                "run": _cmd_run, "bench": _cmd_bench, "serve": _cmd_serve, "attack": _cmd_attack,
                "report": _cmd_report, "sweep": _cmd_sweep}
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
