# Source this file from bash to use the project's interpreter in your own shell:
#
#   source scripts/env.sh      # then: python examples/moe_block.py, python -m bench.bubble, ...
#
# It runs scripts/setup.sh in a child shell (your shell's options are left alone), then
# exports DUALPIPE_PYTHON, puts a `python` for that interpreter first on PATH and the
# checkout's dualpipe and overlap packages on PYTHONPATH (build/pythonpath links to them).  A failed setup returns 1 and changes nothing.
_dp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if _dp_out="$(bash "$_dp_root/scripts/setup.sh")"; then
  DUALPIPE_PYTHON="$(printf '%s\n' "$_dp_out" | sed -n 's/^DUALPIPE_PYTHON=//p')"
  _dp_path="$(printf '%s\n' "$_dp_out" | sed -n 's/^DUALPIPE_PYTHONPATH=//p')"
  export DUALPIPE_PYTHON
  case ":${PYTHONPATH:-}:" in
    *":$_dp_path:"*) ;;
    *) export PYTHONPATH="$_dp_path${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
  case ":$PATH:" in
    *":$_dp_root/build/bin:"*) ;;
    *) export PATH="$_dp_root/build/bin:$PATH" ;;
  esac
  unset _dp_out _dp_root _dp_path
else
  unset _dp_out _dp_root
  echo "[setup] failed (see above); nothing was changed in this shell" >&2
  return 1 2>/dev/null || exit 1
fi
