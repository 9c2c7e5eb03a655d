#!/usr/bin/env bash
# Set up an interpreter for this checkout and build the C++/CUDA extension in place.
#
#   bash scripts/setup.sh            set up (cheap when nothing changed), then print on stdout
#                                    DUALPIPE_PYTHON=<interpreter>
#                                    DUALPIPE_PYTHONPATH=<build/pythonpath: links to dualpipe/ and overlap/>
#   bash scripts/setup.sh --which    print the interpreter setup would use; change nothing
#
# Messages go to stderr; a failure exits non-zero and says why.  ./run and scripts/env.sh
# call this; nothing here changes the calling shell.
#
# Which interpreter:
#   1. $PYTHON, when set: used as it is if it imports torch 2.6-2.14, else .venv is made
#      from it;
#   2. else `python3` on PATH, as it is, if it imports torch 2.6-2.14 (a GPU image, a
#      conda env, a venv you activated): offline, no second torch, nothing downloaded
#      unless a test dependency is missing;
#   3. else this checkout's .venv (made from python3 the first time, with the CPU build
#      of torch==2.13.0: PyTorch's CPU index is added to pip's).
# The package is never pip-installed into the interpreter: the extension (overlap._C) is
# built in place with `setup.py build_ext --inplace` against that interpreter's torch (no
# build isolation, any pip version) and the packages are put on PYTHONPATH (through
# build/pythonpath, which links to dualpipe/ and overlap/ and nothing else).  A CUDA build is
# made when torch has CUDA and nvcc is found (for the visible GPUs' archs, else
# TORCH_CUDA_ARCH_LIST or 9.0), a CPU build otherwise; DUALPIPE_NO_EXT=1 skips it.
# DUALPIPE_REBUILD=1 forces a rebuild.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
say() { echo "[setup] $*" >&2; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# torch_ok PY: 0 if PY imports a torch in the supported range, 3 if out of range, 1 if none
torch_ok() {
  "$1" - <<'EOF' 2>/dev/null
import sys
try:
    import torch
except Exception:
    sys.exit(1)
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (2, 6) <= v < (2, 15) else 3)
EOF
}

choose() {  # sets PY (interpreter) and MODE (asis | venv) and BASE (for a new venv)
  local rc
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable"
    rc=0; torch_ok "$PYTHON" || rc=$?
    if [ "$rc" = 0 ]; then PY="$(command -v "$PYTHON")"; MODE=asis; return; fi
    if [ "$rc" = 3 ]; then
      die "PYTHON=$PYTHON has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), outside the supported 2.6-2.14; unset PYTHON to use .venv"
    fi
    BASE="$PYTHON"; PY="$VENV/bin/python"; MODE=venv; return
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python >= 3.10 or set PYTHON"
  # python3 with torch (an activated env, a GPU image) comes before this checkout's own
  # .venv; without torch the import fails at once, so this costs ~50 ms
  rc=0; torch_ok python3 || rc=$?
  if [ "$rc" = 0 ]; then PY="$(command -v python3)"; MODE=asis; return; fi
  BASE=python3; PY="$VENV/bin/python"; MODE=venv
}

choose
if [ "${1:-}" = "--which" ]; then
  if [ "$MODE" = venv ] && [ ! -x "$PY" ]; then command -v "$BASE"; else echo "$PY"; fi
  exit 0
fi

# Test and demo dependencies: import name -> pip requirement (requirements.txt is the list
# the new .venv gets; an interpreter used as it is only gets what it lacks).
DEPS="matplotlib:matplotlib pytest:pytest pytest_benchmark:pytest-benchmark pytest_timeout:pytest-timeout hypothesis:hypothesis"

missing_deps() {  # prints the pip names of DEPS that "$PY" cannot import
  "$PY" - $DEPS <<'EOF'
import importlib.util, sys
def have(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except Exception:  # a broken or blocked package counts as missing
        return False
print(" ".join(req for mod, req in (d.split(":") for d in sys.argv[1:]) if not have(mod)))
EOF
}

STAMP_DIR="$ROOT/build"
mkdir -p "$STAMP_DIR/bin"
# What goes on PYTHONPATH: a folder with links to the two packages only, not the
# checkout itself, whose top level also holds `kernels` (another project's import name;
# installed, ours is overlap.kernels), `tests`, `bench`, ...
IMPORT_DIR="$STAMP_DIR/pythonpath"
mkdir -p "$IMPORT_DIR"
for pkg in dualpipe overlap; do ln -sfn "../../$pkg" "$IMPORT_DIR/$pkg"; done
probe() {  # sets FACTS, LOADS (ok | none) and REPORT from one interpreter start
  local out
  out="$(cd "$ROOT" && PYTHONPATH="$IMPORT_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/scripts/_setup_probe.py")" \
    || die "$PY could not run scripts/_setup_probe.py (see above)"
  FACTS="$(printf '%s\n' "$out" | sed -n 1p)"
  LOADS="$(printf '%s\n' "$out" | sed -n 2p)"
  REPORT="$(printf '%s\n' "$out" | sed -n 3p)"
}
# One stamp per interpreter: what was set up, for which torch and GPUs, from which sources.
want_stamp() {
  {
    echo "$PY $FACTS ${DUALPIPE_NO_EXT:-} ${DUALPIPE_NO_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-}"
    cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$ROOT/scripts/setup.sh"
    find "$ROOT/csrc" -type f | LC_ALL=C sort | xargs cat
  } 2>/dev/null | sha1sum | cut -d' ' -f1
}

STAMP="$STAMP_DIR/setup-$(echo "$PY" | sha1sum | cut -c1-12).stamp"
if [ "$MODE" = venv ]; then
  if [ ! -x "$PY" ]; then
    say "creating $VENV from $BASE (no Python with torch 2.6-2.14 found; set PYTHON to use one)"
    "$BASE" -m venv "$VENV" || die "could not create $VENV with $BASE -m venv (on Debian/Ubuntu: apt install python3-venv)"
  fi
  if [ ! -f "$STAMP" ] && ! torch_ok "$PY"; then
    say "installing torch into $VENV (the CPU build, torch==2.13.0)"
    # PyPI's default torch wheel for Linux is the multi-GB CUDA build; PyTorch's CPU index
    # holds 2.13.0+cpu, which == 2.13.0 matches and pip prefers (a local copy of that
    # wheel, where pip is configured with one, is taken just the same)
    cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20)
    "$PY" -m pip install -q "${cpu_index[@]}" torch==2.13.0 \
      || "$PY" -m pip install -q "${cpu_index[@]}" "torch>=2.6,<2.15" \
      || die "could not install torch into $VENV: install torch 2.6-2.14 yourself, or set PYTHON to a Python that has it"
  fi
fi

probe
[ "$MODE" = asis ] && say "using $PY as it is (Python, torch, CUDA, GPUs: $FACTS)"
WANT="$(want_stamp)"
if [ "${DUALPIPE_REBUILD:-}" = 1 ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] \
   || { [ "$LOADS" != ok ] && [ "${DUALPIPE_NO_EXT:-}" != 1 ]; }; then
  if [ "$MODE" = venv ]; then
    say "installing the test dependencies into $VENV (requirements.txt)"
    "$PY" -m pip install -q -r "$ROOT/requirements.txt" "setuptools>=64" \
      || die "could not install requirements.txt into $VENV"
    # earlier versions of this script pip-installed the checkout (editable); its import
    # hook would shadow PYTHONPATH for some names, so it goes
    if "$PY" -c 'import importlib.metadata as m; m.version("dualpipe-overlap")' 2>/dev/null; then
      say "removing the editable install of dualpipe-overlap an earlier setup made in $VENV"
      "$PY" -m pip uninstall -q -y dualpipe-overlap || die "could not uninstall dualpipe-overlap from $VENV"
    fi
  else
    miss="$(missing_deps)"
    if [ -n "$miss" ]; then
      say "$PY lacks: $miss; installing them with pip"
      # shellcheck disable=SC2086
      "$PY" -m pip install -q --retries 0 --timeout 10 $miss || true  # offline: fail fast
      still="$(missing_deps)"
      [ -z "$still" ] || say "WARNING: $still still not importable in $PY (offline?): the tests and commands that need them fail until you install them (or unset PYTHON to use a .venv); going on"
    fi
    "$PY" -c 'import triton' 2>/dev/null || say "note: triton is not importable in $PY: the Triton kernels (overlap.kernels) and their tests are skipped"
  fi
  "$PY" -c 'import setuptools' 2>/dev/null || die "$PY has no setuptools, which torch's extension builder needs: $PY -m pip install setuptools"
  if [ "${DUALPIPE_NO_EXT:-}" = 1 ]; then
    say "DUALPIPE_NO_EXT=1: not building the extension (pure-torch fallbacks; the shared-memory transport and CUDA kernels are off)"
  else
    say "building the extension in place (overlap/_C*.so) against this torch; log: build/ext-build.log"
    ( cd "$ROOT" && "$PY" setup.py build_ext --inplace ) > "$STAMP_DIR/ext-build.log" 2>&1 || {
      tail -n 30 "$STAMP_DIR/ext-build.log" >&2
      die "building the extension failed (full log: build/ext-build.log); DUALPIPE_NO_EXT=1 runs without it"
    }
    grep -h "WARNING" "$STAMP_DIR/ext-build.log" | grep "dualpipe-overlap setup" >&2 || true
  fi
  probe
  echo "$WANT" > "$STAMP"
fi

# The extension must load in this interpreter: a missing one is a setup error, not a row
# of failing tests later.
if [ "$LOADS" != ok ]; then
  if [ "${DUALPIPE_NO_EXT:-}" = 1 ]; then REPORT="extension: none (DUALPIPE_NO_EXT=1)"
  else rm -f "$STAMP"; die "$REPORT (log: build/ext-build.log; rebuild: DUALPIPE_REBUILD=1 ./run setup)"; fi
fi
say "$REPORT"

# `python` on PATH for scripts/env.sh users, whatever the interpreter is called
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$STAMP_DIR/bin/python"
chmod +x "$STAMP_DIR/bin/python"
echo "DUALPIPE_PYTHON=$PY"
echo "DUALPIPE_PYTHONPATH=$IMPORT_DIR"
