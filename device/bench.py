"""Device benchmark of TFLite heads with only numpy and an interpreter (no torch, no tensorflow needed).

`bench_model` times one .tflite the way TFLite's `benchmark_model` does and reports with its names:
init, first inference, warm-up mean, then `count` timed runs (at least `runs`, and more until
`min_seconds` have passed), each `time.perf_counter_ns` around set_tensor + invoke + get_tensor on a
seeded random input of the model's own dtype and shape. Times in microseconds.

Memory, as benchmark_model reports it (MB = MiB, resident set size): memory_init_mb and
memory_overall_mb are RSS deltas from the start of the call to after init and after the timed runs;
rss_growth_mb is RSS after the timed runs minus after init (a leak shows here); peak_rss_mb is the
process's high-water mark (VmHWM), which includes whatever the process loaded before. Only a
fresh process gives clean memory figures: `bench_export_dir(..., isolate=True)` runs each
measurement in its own `python -m edgeveil.device.cli bench`.

`bench_path` times what a device does per image beside the raw invoke, on the same interpreter, in
interleaved iterations: raw (set_tensor + invoke + get_tensor on the pre-processed input), path
(`HeadRunner.run` on uint8 pixels: pre-processing, invoke, the manifest's noise, Features), encode
(`FrameEncoder.encode` of those features) and whole (path + encode, one clock). Medians and p90 in
microseconds; ratios are medians over the raw median.
"""
from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .interpreter import RUNTIMES, Runtime, find_interpreter
from .files import read_json, sha256_file
from .manifest import artifact_path, read_manifest

__all__ = ["SCHEMA", "PATH_SCHEMA", "bench_model", "bench_export_dir", "bench_path", "machine_info",
           "format_table", "format_path_table"]

SCHEMA = "edgeveil.bench/1"
PATH_SCHEMA = "edgeveil.bench_path/1"
PATH_STAGES = ("raw", "path", "encode", "whole")
_MIB = 1024.0 * 1024.0


def bench_model(model_path, *, runtime=None, runs: int = 100, warmup: int = 10, threads: int | None = 1,
                xnnpack: bool = True, min_seconds: float = 0.0, seed: int = 0) -> dict:
    """Benchmark one .tflite file; returns a JSON-ready dict (see the module docstring).

    runtime: None (find_interpreter()), a runtime name or a Runtime. threads: None is the runtime's
    default. xnnpack=False asks for the builtin kernels without the default delegate; the result's
    `xnnpack` says whether the delegate really took part (None if the runtime cannot tell).
    """
    path = Path(model_path)
    _check_counts(runs, warmup, min_seconds)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    runtime = _runtime(runtime)
    rss_start = _rss_bytes()
    started = time.perf_counter_ns()
    model = runtime.make(path, num_threads=threads, xnnpack=xnnpack)
    init_ns = time.perf_counter_ns() - started
    rss_init = _rss_bytes()
    invoke = _invoker(model, np.random.default_rng(seed))
    first_ns = invoke()
    warm = [invoke() for _ in range(warmup)]
    timed = _timed_runs(invoke, runs, min_seconds)
    rss_end = _rss_bytes()
    us = np.asarray(timed, dtype=np.float64) / 1e3
    inp = model.get_input_details()[0]
    return {
        "model": str(path), "model_bytes": path.stat().st_size, "model_sha256": sha256_file(path),
        "runtime": {"name": model.runtime, "version": model.version}, "resolver": model.resolver,
        "xnnpack": model.xnnpack, "xnnpack_requested": bool(xnnpack), "num_threads": threads,
        "input": {"shape": [int(d) for d in inp["shape"]], "dtype": np.dtype(inp["dtype"]).name},
        "init_us": _r(init_ns / 1e3), "first_inference_us": _r(first_ns / 1e3), "warmup_runs": warmup,
        "warmup_avg_us": _r(float(np.mean(warm)) / 1e3) if warm else None,
        "count": int(us.size), "avg_us": _r(us.mean()), "std_us": _r(us.std()),
        "min_us": _r(us.min()), "max_us": _r(us.max()),
        **{f"p{q}_us": _r(np.percentile(us, q)) for q in (50, 90, 99)},
        "memory_init_mb": _mb_delta(rss_init, rss_start), "memory_overall_mb": _mb_delta(rss_end, rss_start),
        "peak_rss_mb": _peak_rss_mb(), "rss_growth_mb": _mb_delta(rss_end, rss_init),
        "machine": machine_info(),
    }


def bench_export_dir(export_dir, *, runs: int = 100, warmup: int = 10, threads=(1, 2), xnnpack=(True, False),
                     min_seconds: float = 0.0, runtime=None, isolate: bool = False, on_result=None) -> dict:
    """Benchmark every artifact of an export folder (sha256 checked) for each thread count and XNNPACK setting.

    Writes nothing. Returns {"schema", "export_dir", "model_id", "runtime", "machine", "settings",
    "results": [bench_model dict + "precision", "file"], "skipped": [{"precision", "threads",
    "xnnpack_requested", "reason"}]}. Settings the runtime cannot honour (XNNPACK off without an
    OpResolverType) are skipped, saying so. isolate=True measures each in a fresh process (clean
    memory figures; runtime must then be None or a name). on_result(done, total, row) reports progress.
    """
    export_dir = Path(export_dir)
    manifest_path = export_dir / "manifest.json"
    manifest = read_manifest(manifest_path)
    runtime = _runtime(runtime)
    if isolate and runtime.name not in RUNTIMES:
        raise ValueError(f"isolate=True needs a named runtime, not an injected one ({runtime.name})")
    plan = [(p, t, x) for p in manifest["artifacts"] for t in threads for x in xnnpack]
    results, skipped = [], []
    for done, (precision, t, x) in enumerate(plan, start=1):
        path = artifact_path(manifest_path, precision, manifest)
        if not x and runtime.resolver_enum is None:
            row = {"precision": precision, "threads": t, "xnnpack_requested": False,
                   "reason": f"{runtime.name} {runtime.version} cannot turn XNNPACK off (no OpResolverType)"}
            skipped.append(row)
        elif x and manifest["artifacts"][precision].get("xnnpack_safe") is False:
            row = {"precision": precision, "threads": t, "xnnpack_requested": True,
                   "reason": "the manifest marks this artifact unsafe for XNNPACK (quantization scales below "
                             "1e-6: a dead layer); XNNPACK refuses or aborts on it"}
            skipped.append(row)
        else:
            kwargs = dict(runs=runs, warmup=warmup, threads=t, xnnpack=x, min_seconds=min_seconds)
            row = _bench_isolated(path, runtime.name, **kwargs) if isolate else bench_model(
                path, runtime=runtime, **kwargs)
            row.pop("machine", None)
            row = {"precision": precision, "file": path.name, **row}
            results.append(row)
        if on_result is not None:
            on_result(done, len(plan), row)
    return {"schema": SCHEMA, "export_dir": str(export_dir), "model_id": manifest["model_id"],
            "runtime": {"name": runtime.name, "version": runtime.version}, "machine": machine_info(),
            "settings": {"runs": runs, "warmup": warmup, "min_seconds": min_seconds, "threads": list(threads),
                         "xnnpack": [bool(x) for x in xnnpack], "isolated": isolate},
            "results": results, "skipped": skipped}


def bench_path(export_dir, precision: str = "int8", *, runs: int = 1000, warmup: int = 50, threads: int | None = 1,
               xnnpack: bool = True, runtime=None, seed: int = 0, images: int = 16) -> dict:
    """Per-image path against raw invoke, interleaved (see the module docstring); returns a JSON-ready dict.

    export_dir: an export folder (manifest.json beside the .tflite files); precision: its artifact.
    Inputs: `images` seeded random uint8 images of the head's input shape, used in turn. Each
    iteration times raw and the path back to back, alternating which goes first; GC paused.
    """
    from .runner import HeadRunner
    from .wire import FrameEncoder, new_device_key

    _check_counts(runs, warmup, 0.0)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be an int >= 1, got {images!r}")
    runner = HeadRunner(export_dir, precision, runtime=_runtime(runtime), num_threads=threads, xnnpack=xnnpack,
                        noise_seed=seed)
    pool = np.random.default_rng(seed).integers(0, 256, (images, 1, *runner.input_shape), dtype=np.uint8)
    inputs = [runner.preprocess(im) for im in pool]
    encoder = FrameEncoder(key=new_device_key(), device_id="bench", model_id=runner.model_id)
    raw, path = _raw_call(runner), _path_call(runner, encoder)
    for i in range(warmup):
        raw(inputs[i % images])
        path(pool[i % images])
    times = {stage: [] for stage in PATH_STAGES}
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for i in range(runs):
            k = i % images
            if i % 2:
                times["raw"].append(raw(inputs[k]))
            spent = path(pool[k])
            if not i % 2:
                times["raw"].append(raw(inputs[k]))
            for stage, ns in zip(PATH_STAGES[1:], spent):
                times[stage].append(ns)
    finally:
        if gc_was_on:
            gc.enable()
    return _path_report(runner, encoder, pool[0], times, dict(runs=runs, warmup=warmup, threads=threads,
                                                               xnnpack=xnnpack, seed=seed, images=images))


def _raw_call(runner):
    interp, index, out = runner.loaded.interpreter, runner._in_index, runner._out_index
    set_tensor, invoke, get_tensor, clock = interp.set_tensor, interp.invoke, interp.get_tensor, time.perf_counter_ns

    def raw(x) -> int:
        start = clock()
        set_tensor(index, x)
        invoke()
        get_tensor(out)
        return clock() - start

    return raw


def _path_call(runner, encoder):
    run, encode, clock = runner.run, encoder.encode, time.perf_counter_ns

    def path(image) -> tuple[int, int, int]:
        start = clock()
        feats = run(image)
        ran = clock()
        encode(feats.values, scale=feats.scale, zero_point=feats.zero_point)
        done = clock()
        return ran - start, done - ran, done - start

    return path


def _path_report(runner, encoder, image, times: dict, settings: dict) -> dict:
    stats = {}
    for stage, ns in times.items():
        us = np.asarray(ns, dtype=np.float64) / 1e3
        stats[stage] = {"p50_us": _r(np.percentile(us, 50)), "p90_us": _r(np.percentile(us, 90)),
                        "mean_us": _r(us.mean()), "min_us": _r(us.min()), "count": int(us.size)}
    feats = runner.run(image)
    frame = encoder.encode(feats.values, scale=feats.scale, zero_point=feats.zero_point)
    raw = stats["raw"]["p50_us"]
    return {"schema": PATH_SCHEMA, "model": str(runner.path), "precision": runner.precision,
            "model_id": runner.model_id, "runtime": {"name": runner.runtime_name, "version": runner.loaded.version},
            "xnnpack": runner.xnnpack, "num_threads": settings["threads"], "settings": settings,
            "input": {"shape": [1, *runner.input_shape], "dtype": runner._table.dtype.name},
            "features": {"shape": list(feats.values.shape), "dtype": feats.values.dtype.name},
            "frame_bytes": len(frame), "noise": runner.noise_spec, "stages": stats,
            "ratios": {f"{stage}/raw": _r(stats[stage]["p50_us"] / raw) for stage in ("path", "whole")},
            "machine": machine_info()}


def format_path_table(result: dict) -> str:
    """The bench_path result as a short fixed-width table: one line per stage."""
    what = {"raw": "raw set_tensor+invoke+get_tensor", "path": "HeadRunner.run (pixels -> features)",
            "encode": f"FrameEncoder.encode ({result['frame_bytes']} B frame)", "whole": "run + encode"}
    rows = [("stage", "p50_us", "p90_us", "mean_us", "x raw p50")]
    raw = result["stages"]["raw"]["p50_us"]
    for stage in PATH_STAGES:
        s = result["stages"][stage]
        rows.append((what[stage], f"{s['p50_us']:.1f}", f"{s['p90_us']:.1f}", f"{s['mean_us']:.1f}",
                     "-" if stage in ("raw", "encode") else f"{s['p50_us'] / raw:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def machine_info() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}


def format_table(results: list[dict]) -> str:
    """A short fixed-width table of bench_model results (one line each)."""
    head = ("model", "runtime", "thr", "xnnpack", "init_us", "avg_us", "p50_us", "p90_us", "p99_us", "count",
            "rss_mb")
    lines = [head]
    for r in results:
        xnn = {True: "on", False: "off", None: "?"}[r["xnnpack"]]
        if r["xnnpack"] != r["xnnpack_requested"]:
            xnn += " (asked " + ("on" if r["xnnpack_requested"] else "off") + ")"
        runtime = f"{r['runtime']['name']} {r['runtime']['version']}"
        lines.append((r.get("precision") or Path(r["model"]).name, runtime, str(r["num_threads"] or "default"),
                      xnn, *(f"{r[k]:.1f}" for k in head[4:9]), str(r["count"]),
                      "-" if r["memory_overall_mb"] is None else f"{r['memory_overall_mb']:.1f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


# ------------------------------------------------------------------------------- helpers


def _check_counts(runs, warmup, min_seconds) -> None:
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, (int, float)) or not 0 <= min_seconds < 3600:
        raise ValueError(f"min_seconds must be a number in [0, 3600), got {min_seconds!r}")


def _runtime(runtime) -> Runtime:
    return runtime if isinstance(runtime, Runtime) else find_interpreter(runtime)


def _invoker(model, rng: np.random.Generator):
    """A function running one inference on fixed random inputs; returns its duration in ns."""
    inputs = [(d["index"], _random_input(d, rng)) for d in model.get_input_details()]
    outputs = [d["index"] for d in model.get_output_details()]
    set_tensor, invoke, get_tensor, clock = model.set_tensor, model.invoke, model.get_tensor, time.perf_counter_ns

    def once() -> int:
        start = clock()
        for index, value in inputs:
            set_tensor(index, value)
        invoke()
        for index in outputs:
            get_tensor(index)
        return clock() - start

    return once


def _random_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
    dtype, shape = np.dtype(detail["dtype"]), tuple(int(d) for d in detail["shape"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    return rng.standard_normal(shape).astype(dtype)


def _timed_runs(invoke, runs: int, min_seconds: float) -> list[int]:
    """At least `runs` inferences, continuing until `min_seconds` have passed; GC paused meanwhile."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        deadline = time.perf_counter_ns() + int(min_seconds * 1e9)
        timed = []
        while len(timed) < runs or time.perf_counter_ns() < deadline:
            timed.append(invoke())
        return timed
    finally:
        if gc_was_on:
            gc.enable()


def _bench_isolated(path: Path, runtime_name: str, **kwargs) -> dict:
    """bench_model in a fresh `python -m edgeveil.device.cli bench` process."""
    with tempfile.TemporaryDirectory(prefix="edgeveil-bench-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "edgeveil.device.cli", "bench", str(path), "--runtime", runtime_name,
               "--runs", str(kwargs["runs"]), "--warmup", str(kwargs["warmup"]),
               "--min-seconds", str(kwargs["min_seconds"]), "--json", str(out), "--quiet"]
        if kwargs["threads"] is not None:
            cmd += ["--threads", str(kwargs["threads"])]
        if not kwargs["xnnpack"]:
            cmd.append("--no-xnnpack")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {path} failed in a subprocess: {proc.stderr.strip()[-2000:]}")
        return read_json(out)


def _rss_bytes() -> int | None:
    """Current resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _peak_rss_mb() -> float | None:
    """Peak RSS of this address space: VmHWM on Linux (reset by exec, unlike ru_maxrss, which a
    process started from a large parent inherits), else ru_maxrss."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return _r(int(line.split()[1]) / 1024.0)  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _r(peak / (_MIB if sys.platform == "darwin" else 1024.0))  # bytes on macOS, KiB on Linux


def _mb_delta(after: int | None, before: int | None) -> float | None:
    return None if after is None or before is None else _r((after - before) / _MIB)


def _r(value: float) -> float:
    return round(float(value), 3)
