# Sourced by ./run: create .venv and install what the project needs, once.
# Re-runs are cheap: a stamp file records what was installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.dualpipe-stamp"
# The extension's sources are part of the stamp: an edited csrc/ is rebuilt on the next run.
WANT="$( { cat "$ROOT/setup.py" "$ROOT/scripts/env.sh" "$ROOT/requirements.txt"; \
          find "$ROOT/csrc" -type f | LC_ALL=C sort | xargs cat; } 2>/dev/null | sha1sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing torch and test dependencies into $VENV" >&2
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    # A CPU build of torch; on a machine whose python already has torch, reuse that.
    "$VPY" -m pip install -q torch==2.13.0 || "$VPY" -m pip install -q "torch>=2.6,<2.15"
  fi
  "$VPY" -m pip install -q -r "$ROOT/requirements.txt"
  echo "[setup] building and installing the package (extension included)" >&2
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
