#!/usr/bin/env bash
# Create (or update) the circuit-tracer environment that tests/interp/test_circuit_tracer.py runs
# circuit-tracer in. scripts/setup.sh calls it when the test extra is installed. It is a venv of
# its own: circuit-tracer 0.5.0 pins transformers<=4.57.3, the project runs 5.x. Idempotent: a
# second call with nothing changed does nothing (about a minute from nothing, 1.6 GB).
#   VENV                 the project's venv (default: .venv)
#   CIRCUIT_TRACER_VENV  where this one lives (default: "$VENV-circuit-tracer", i.e. .venv-circuit-tracer)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CIRCUIT_VENV="${CIRCUIT_TRACER_VENV:-$VENV-circuit-tracer}"
STAMP="$CIRCUIT_VENV/.saeforge-installed"
PYTHON="${PYTHON:-python3}"

want="$(cat constraints-circuit-tracer.txt scripts/setup_circuit_tracer.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
echo "setup: building the circuit-tracer environment $CIRCUIT_VENV (about a minute)"
[[ -x "$CIRCUIT_VENV/bin/python" ]] || "$PYTHON" -m venv "$CIRCUIT_VENV"
PIP=("$CIRCUIT_VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" setuptools wheel

# As scripts/setup.sh does: keep a torch already installed here (e.g. a CUDA build), else the
# pinned CPU build, installed alone first so nothing that depends on torch can pull another.
constraints="$CIRCUIT_VENV/constraints.txt"
installed_torch="$("$CIRCUIT_VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ -n "$installed_torch" ]]; then
    sed "s/^torch==.*/torch==$installed_torch/" constraints-circuit-tracer.txt > "$constraints"
else
    cp constraints-circuit-tracer.txt "$constraints"
    "${PIP[@]}" install -q -c "$constraints" torch
fi
"${PIP[@]}" install -q -c "$constraints" circuit-tracer nnsight transformers transformer-lens
"$CIRCUIT_VENV/bin/python" -c "import circuit_tracer.replacement_model, circuit_tracer.attribution"
echo "$want" > "$STAMP"
