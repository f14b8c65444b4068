"""The arm64 userland benchmarks/arm64_device.py runs in: qemu-user, a sysroot and aarch64 wheels.

`prepare(Userland(DIR))` installs qemu-user if needed (apt-get, as root), extracts Debian bookworm's
arm64 python3.11 and the libraries it loads into DIR/sysroot (`apt-get download NAME:arm64`, then
`dpkg -x`; ../shared/research/arm64_userland.md), and installs aarch64 cp311 wheels from this
machine with `pip install --target --platform ...`: DIR/site-litert holds `edgeveil[device]` and
nothing else, DIR/site-tflrt tflite-runtime with numpy<2 and edgeveil without dependencies (when an
aarch64 cp311 wheel of it exists). `Userland.missing()` names every missing step.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeveil.device.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path(os.environ.get("EDGEVEIL_ARM64", Path.home() / ".cache/edgeveil/arm64"))
SCHEMA = "edgeveil.arm64_userland/1"
# Bookworm's arm64 python3.11 and the libraries it loads (../shared/research/arm64_userland.md).
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
        "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libstdc++6", "libgcc-s1", "libsqlite3-0", "libncursesw6",
        "libtinfo6", "libreadline8", "libuuid1", "libdb5.3", "libgdbm6", "libnsl2", "libtirpc3", "libcrypt1",
        "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1")
# Bookworm has glibc 2.36, so every manylinux tag up to 2_36 runs there.
PIP_AARCH64 = ["--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux2014_aarch64",
               "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux_2_28_aarch64",
               "--platform", "manylinux_2_34_aarch64"]
TIMEOUT = 3600


class Userland:
    """The prepared arm64 userland: a sysroot and one site folder per interpreter package."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.sysroot, self.debs = self.base / "sysroot", self.base / "debs"
        self.python = self.sysroot / "usr" / "bin" / "python3.11"
        self.sites = {"ai_edge_litert": self.base / "site-litert", "tflite_runtime": self.base / "site-tflrt"}

    def command(self, *args) -> list[str]:
        return ["qemu-aarch64", "-L", str(self.sysroot), str(self.python), *map(str, args)]

    def env(self, runtime: str) -> dict:
        """Only the aarch64 site on the path: the installed edgeveil, never the checkout."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        return {**env, "PYTHONPATH": str(self.sites[runtime]), "PYTHONNOUSERSITE": "1"}

    def ready(self, runtime: str) -> bool:
        site = self.sites[runtime]
        return (site / "edgeveil" / "device").is_dir() and (site / runtime).is_dir()

    def missing(self) -> list[str]:
        """Every missing prerequisite, each with the step that provides it."""
        prepare = f"python benchmarks/arm64_device.py --prepare --arm64-dir {self.base} (as root)"
        problems = []
        if shutil.which("qemu-aarch64") is None:
            problems.append(f"qemu-aarch64 is not installed: apt-get install qemu-user, or {prepare}")
        if not self.python.is_file():
            problems.append(f"no arm64 python3.11 at {self.python}: {prepare} (apt-get download the arm64 "
                            f"packages, dpkg -x them into {self.sysroot})")
        if not self.ready("ai_edge_litert"):
            problems.append(f"no aarch64 edgeveil[device] environment in {self.sites['ai_edge_litert']}: {prepare} "
                            "(pip install --target with the aarch64 platform tags)")
        return problems


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its command line and the tail of its output."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed (exit {done.returncode}):\n{tail}")
    return done


# ------------------------------------------------------------------------------- preparing


def prepare(u: Userland) -> dict:
    """qemu-user and the arm64 sysroot (each skipped when present), then the aarch64 sites, rebuilt."""
    u.base.mkdir(parents=True, exist_ok=True)
    _ensure_qemu()
    _ensure_sysroot(u)
    wheel = _edgeveil_wheel(u.base)
    _ensure_litert_site(u, wheel)
    tflrt = _ensure_tflrt_site(u, wheel)
    info = {"schema": SCHEMA, "qemu": qemu_version(), "sysroot_python": arm64_python_version(u),
            "debs": sorted(p.name for p in u.debs.glob("*.deb")),
            "sites": {name: pip_list(site) for name, site in u.sites.items() if site.is_dir()},
            "tflite_runtime_wheel": tflrt}
    atomic_write_json(u.base / "prepared.json", info)
    return info


def _need_root(step: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"--prepare needs root for this step: {step}")


def _ensure_qemu() -> None:
    if shutil.which("qemu-aarch64"):
        return
    _need_root("apt-get install qemu-user")
    log("apt-get install qemu-user")
    sh(["apt-get", "update"])
    sh(["apt-get", "install", "-y", "qemu-user"])


def _ensure_sysroot(u: Userland) -> None:
    if u.python.is_file():
        return
    if "arm64" not in sh(["dpkg", "--print-foreign-architectures"]).stdout.split():
        _need_root("dpkg --add-architecture arm64 && apt-get update")
        log("dpkg --add-architecture arm64; apt-get update")
        sh(["dpkg", "--add-architecture", "arm64"])
        sh(["apt-get", "update"])
    u.debs.mkdir(parents=True, exist_ok=True)
    log(f"apt-get download {len(DEBS)} arm64 packages into {u.debs}")
    sh(["apt-get", "download", *(f"{name}:arm64" for name in DEBS)], cwd=u.debs)
    staging = Path(tempfile.mkdtemp(prefix="sysroot.", dir=u.base))
    for deb in sorted(u.debs.glob("*_arm64.deb")):
        sh(["dpkg", "-x", deb, staging])
    staging.rename(u.sysroot)
    machine = arm64_python_version(u)
    if not machine.startswith("aarch64"):
        raise RuntimeError(f"the sysroot's python reports {machine!r}, expected aarch64")


def _edgeveil_wheel(base: Path) -> Path:
    """A wheel of this checkout, built from a copy (pip builds in place; the checkout stays clean)."""
    out = base / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="edgeveil-src-") as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for name in ("training", "export", "device", "cloud_sim", "pipeline"):
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, src])
    return next(out.glob("edgeveil-*.whl"))


def _pip_target(site: Path, *requirements, no_deps: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade",
           "--target", site, *PIP_AARCH64, *(["--no-deps"] if no_deps else []), *requirements]
    sh(cmd)


def _ensure_litert_site(u: Userland, wheel: Path) -> None:
    """edgeveil[device] and nothing else: the resolver picks numpy and ai-edge-litert for aarch64 cp311."""
    site = u.sites["ai_edge_litert"]
    shutil.rmtree(site, ignore_errors=True)
    log(f"pip install --target {site} 'edgeveil[device]' (aarch64, cp311)")
    _pip_target(site, f"edgeveil[device] @ {wheel.as_uri()}")


def _ensure_tflrt_site(u: Userland, wheel: Path) -> dict:
    """tflite-runtime, if an aarch64 cp311 wheel exists: with numpy<2 (its ABI) and edgeveil --no-deps."""
    site = u.sites["tflite_runtime"]
    shutil.rmtree(site, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp,
                               *PIP_AARCH64, "tflite-runtime"], capture_output=True, text=True, timeout=TIMEOUT)
        found = sorted(p.name for p in Path(tmp).glob("*.whl"))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        log(f"no aarch64 cp311 tflite-runtime wheel: {reason}")
        return {"exists": False, "wheel": None, "reason": reason}
    log(f"pip install --target {site} 'numpy<2' tflite-runtime; edgeveil --no-deps")
    _pip_target(site, "numpy<2", "tflite-runtime")
    _pip_target(site, wheel, no_deps=True)
    return {"exists": True, "wheel": found[0]}


def refresh_edgeveil(u: Userland) -> None:
    """Put this checkout's edgeveil into every prepared site (no dependencies, nothing downloaded)."""
    wheel = _edgeveil_wheel(u.base)
    for runtime, site in u.sites.items():
        if u.ready(runtime):
            _pip_target(site, wheel, no_deps=True)


def qemu_version() -> str:
    return sh(["qemu-aarch64", "--version"]).stdout.splitlines()[0].strip()


def arm64_python_version(u: Userland) -> str:
    code = "import platform; print(platform.machine(), platform.python_version())"
    return sh(u.command("-c", code), env=u.env("ai_edge_litert")).stdout.strip()


def pip_list(site: Path) -> dict:
    done = sh([sys.executable, "-m", "pip", "list", "--disable-pip-version-check", "--format=json",
               "--path", site])
    return {row["name"]: row["version"] for row in json.loads(done.stdout)}
