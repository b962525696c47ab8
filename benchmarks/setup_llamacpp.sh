#!/usr/bin/env bash
# Builds llama.cpp's Python binding (llama-cpp-python) for benchmarks/bench_inference.py, into build/llamacpp
# (git-ignored), outside the project's .venv: the benchmark puts that folder on sys.path when it is there.
# Never part of `make test`. It compiles llama.cpp from the sdist for this CPU (GGML_NATIVE: AVX2/AVX-512 as
# the machine has them): about 4-8 minutes on 2 cores.
#
#     bash benchmarks/setup_llamacpp.sh            # then: .venv/bin/python benchmarks/bench_inference.py --threads 2
#
# Its runtime dependencies that .venv lacks (diskcache) go into the same folder; numpy, jinja2 and
# typing-extensions come from .venv (torch and the project already need them).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${LLAMACPP_DIR:-build/llamacpp}"
PY="${PYTHON:-.venv/bin/python}"
if PYTHONPATH="$DEST" "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already in $DEST"; exit 0
fi
mkdir -p "$DEST"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}"
"$PY" -m pip install --no-deps --target "$DEST" --upgrade "llama-cpp-python==$VERSION" diskcache
PYTHONPATH="$DEST" "$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $DEST')"
