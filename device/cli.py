"""`edgeveil-device`: the board-side command. Imports only edgeveil.device (numpy + an interpreter).

    edgeveil-device bench MODEL.tflite [--runs N --warmup N --threads T --no-xnnpack --json PATH]
    edgeveil-device bench MODEL.tflite --path [--runs N ...]   # per-image path beside raw invoke

--path needs the export folder (manifest.json beside MODEL.tflite; MODEL may also be the folder,
with --precision): it times HeadRunner.run and the frame encode against raw invoke, interleaved.

Prints a short table (and with --json writes the full result atomically). Problems the user can fix
(missing or corrupt model, no interpreter, a setting the runtime cannot honour) print one line on
stderr and exit 1, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_PROG = "edgeveil-device"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="edgeveil on the board: benchmark a TFLite head "
                                     "with numpy and a TFLite interpreter only.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmark one .tflite model (latency in us, memory in MB)",
                           description="Time set_tensor + invoke + get_tensor on a seeded random input, "
                                       "with benchmark_model's metric names.")
    bench.add_argument("model", metavar="MODEL.tflite", help="the model file")
    bench.add_argument("--runs", type=int, default=100, help="timed runs (at least; default 100)")
    bench.add_argument("--warmup", type=int, default=10,
                       help="warm-up runs after the first inference (default 10)")
    bench.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    bench.add_argument("--no-xnnpack", dest="xnnpack", action="store_false",
                       help="builtin kernels without the default XNNPACK delegate")
    bench.add_argument("--min-seconds", type=float, default=0.0, help="keep timing at least this long (default 0)")
    bench.add_argument("--runtime", choices=_runtime_names(), default=None,
                       help="interpreter to use (default: the first found)")
    bench.add_argument("--json", metavar="PATH", default=None, help="also write the full result as JSON")
    bench.add_argument("--path", action="store_true",
                       help="time the per-image path (pre-processing, invoke, features, frame encode) beside "
                            "raw invoke, interleaved; needs manifest.json beside the model")
    bench.add_argument("--precision", default=None,
                       help="with --path and MODEL an export folder: the artifact (default int8)")
    bench.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def _runtime_names() -> list[str]:
    from .interpreter import RUNTIMES

    return list(RUNTIMES)


def _cmd_bench(args) -> int:
    if args.path:
        return _cmd_bench_path(args)
    from .bench import bench_model, format_table
    from .files import atomic_write_json

    result = bench_model(args.model, runtime=args.runtime, runs=args.runs, warmup=args.warmup,
                         threads=args.threads, xnnpack=args.xnnpack, min_seconds=args.min_seconds)
    if args.json:
        atomic_write_json(args.json, result)
    if not args.quiet:
        print(format_table([result]))
        m = result["machine"]
        print(f"{result['model_bytes']} bytes; init {result['init_us']:.0f} us, "
              f"first {result['first_inference_us']:.0f} us; "
              f"peak RSS {result['peak_rss_mb']} MB; {m['machine']} x{m['cpu_count']}, {m['platform']}")
        if args.json:
            print(f"wrote {args.json}")
    return 0


def _cmd_bench_path(args) -> int:
    from .bench import bench_path, format_path_table
    from .files import atomic_write_json

    export_dir, precision = _export_artifact(args.model, args.precision)
    result = bench_path(export_dir, precision, runtime=args.runtime, runs=args.runs, warmup=args.warmup,
                        threads=args.threads, xnnpack=args.xnnpack)
    if args.json:
        atomic_write_json(args.json, result)
    if not args.quiet:
        print(format_path_table(result))
        m, r = result["machine"], result["ratios"]
        print(f"{result['precision']} {result['model']}: path/raw {r['path/raw']:.2f}, whole/raw {r['whole/raw']:.2f} "
              f"(medians of {result['stages']['raw']['count']} interleaved runs); {result['runtime']['name']} "
              f"{result['runtime']['version']}, XNNPACK {result['xnnpack']}; {m['machine']} x{m['cpu_count']}")
        if args.json:
            print(f"wrote {args.json}")
    return 0


def _export_artifact(model: str, precision: str | None) -> tuple:
    """(export folder, precision) for --path: MODEL is a folder, or a .tflite named in the manifest beside it."""
    from pathlib import Path

    from .manifest import read_manifest

    path = Path(model)
    folder = path if path.is_dir() else path.parent
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"--path needs the export folder: no manifest.json in {folder}")
    if path.is_dir():
        return folder, precision or "int8"
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    named = [p for p, e in read_manifest(folder / "manifest.json")["artifacts"].items() if e["file"] == path.name]
    if not named:
        raise ValueError(f"{folder / 'manifest.json'} names no artifact file {path.name!r}")
    if precision is not None and precision != named[0]:
        raise ValueError(f"--precision {precision} disagrees with {path.name}, the manifest's {named[0]!r}")
    return folder, named[0]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .interpreter import InterpreterError

    try:
        return _cmd_bench(args)
    except (FileNotFoundError, InterpreterError, ImportError, ValueError, OSError) as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
