#!/usr/bin/env bash
# CI: the board-side runtime in two clean environments, with no torch and no tensorflow:
#   (a) numpy 2 + ai-edge-litert          (b) numpy<2 + tflite-runtime 2.14 (its wheels need NumPy 1.x)
# Each gets a fresh venv with only what a board installs, plus edgeveil itself with --no-deps (so no
# pyyaml or tqdm from us), then tests/fixtures/device_smoke.py checks imports, bit-exactness against the
# committed fixture, noise, wire frames and the benchmark. Exit 0: both passed; 1: a check or an install
# failed; 75: the package registry is unreachable (nothing was tested).
# Usage: .ci/device_envs.sh [a|b ...]   (default: both). PYTHON overrides the interpreter (python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
python=${PYTHON:-python3.11}
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/edgeveil-device-envs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# pip builds a local project in place: install from a copy so the checkout gets no build/ or egg-info.
mkdir "$work/src"
tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml README.md training export device cloud_sim pipeline \
    | tar -x -C "$work/src"

env_packages() {
    case "$1" in
        a) echo "ai_edge_litert ai-edge-litert numpy>=2 ai-edge-litert" ;;
        b) echo "tflite_runtime tflite-runtime numpy<2 tflite-runtime==2.14.*" ;;
    esac
}

run_env() {
    local name=$1 t0 runtime dist packages venv
    t0=$(date +%s)
    read -r runtime dist packages <<<"$(env_packages "$name")"
    venv="$work/venv-$name"
    echo "== env $name: $python -m venv; pip install $packages; pip install --no-deps edgeveil"
    "$python" -m venv "$venv"
    if ! "$venv/bin/python" -m pip index versions "$dist" >/dev/null 2>&1; then
        echo "== package registry unreachable (pip index versions $dist failed)" >&2
        exit 75
    fi
    # shellcheck disable=SC2086  # $packages is a word list on purpose
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $packages
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$work/src"
    "$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check | tr '\n' ' '
    echo
    echo "== env $name: installed in $(( $(date +%s) - t0 )) s; smoke check"
    # Run outside the checkout, so only the installed edgeveil can be imported.
    (cd "$work" && "$venv/bin/python" "$repo/tests/fixtures/device_smoke.py" --expect "$runtime" \
        --fixture "$repo/tests/fixtures/digits_tiny")
    echo "== env $name: passed in $(( $(date +%s) - t0 )) s"
}

envs=("$@")
[ ${#envs[@]} -eq 0 ] && envs=(a b)
for name in "${envs[@]}"; do
    case "$name" in a|b) ;; *) echo "unknown environment $name (a or b)" >&2; exit 1 ;; esac
done
for name in "${envs[@]}"; do
    run_env "$name"
done
echo "== device envs (${envs[*]}) passed in $(( $(date +%s) - start )) s"
