#!/usr/bin/env bash
# Build the test environment of one ModelZoo release, as that release's own requirements say, then
# add this package the no-change way (scripts/install_into_env.py).
#
#   scripts/build_modelzoo_env.sh MODELZOO_CHECKOUT VENV [BIGCODE_EVAL_SOURCE]
#
# MODELZOO_CHECKOUT: a clone of Cerebras/modelzoo at tag Release_2.X.0 (outside this repository:
# ModelZoo's code is never committed here). VENV: created with $PYTHON (default python3.11, the only
# Python cerebras-pytorch has wheels for) if it does not exist, reused if it does.
# BIGCODE_EVAL_SOURCE (optional): a bigcode-evaluation-harness source tree at the commit the release
# pins; installed with --no-deps (its own pins are old numpy/transformers). Without it, `cszoo fit`
# cannot import ModelZoo's eval harness module; the tests put a stand-in in its place.
#
# What differs from `pip install -r requirements.txt` (each line is printed when it applies):
# - the GitHub archive lines: lm-eval is taken from PyPI at the tag's version (the same release),
#   lm-dataformat from PyPI (0.0.20), bigcode_eval from BIGCODE_EVAL_SOURCE; nothing else is fetched;
# - what the release needs to import today: cerebras-appliance 2.6-2.8 read
#   `psutil._pslinux.pfullmem` (removed in psutil 7.2) and ask only `psutil>=5.8.0`, so `psutil<7.2`
#   is added for them (2.9 and 2.10 pin psutil 7.1.3 themselves);
# - ModelZoo itself is installed editable with --no-deps (its setup.py repeats requirements.txt,
#   GitHub lines included).
set -euo pipefail

die() { echo "build_modelzoo_env: $*" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 3 ] || die "usage: $0 MODELZOO_CHECKOUT VENV [BIGCODE_EVAL_SOURCE]"
MZ=$(cd "$1" && pwd) || die "no such ModelZoo checkout: $1"
VENV=$2
BIGCODE=${3:-}
PYTHON=${PYTHON:-python3.11}
HERE=$(cd "$(dirname "$0")" && pwd)

REQ="$MZ/requirements.txt"
[ -f "$REQ" ] || die "$REQ not found: MODELZOO_CHECKOUT must be the root of a Cerebras/modelzoo clone"
RELEASE=$(sed -n 's/^ *__version__ = "\([0-9.]*\)".*/\1/p' "$MZ/setup.py")
[ -n "$RELEASE" ] || die "no __version__ in $MZ/setup.py"
echo "ModelZoo $RELEASE at $MZ -> $VENV"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# requirements.txt without its GitHub archive lines, with their PyPI equivalents
: >"$WORK/requirements.txt"
while IFS= read -r line; do
    case "$line" in
    lm-eval\ @\ *github.com*)
        version=$(sed -n 's#.*/v\([0-9.]*\)\.zip$#\1#p' <<<"$line")
        [ -n "$version" ] || die "cannot read lm-eval's version from: $line"
        echo "  $line -> lm-eval==$version (PyPI)"
        echo "lm-eval==$version" >>"$WORK/requirements.txt" ;;
    lm-dataformat\ @\ *github.com*)
        echo "  $line -> lm-dataformat==0.0.20 (PyPI)"
        echo "lm-dataformat==0.0.20" >>"$WORK/requirements.txt" ;;
    bigcode_eval\ @\ *github.com*)
        BIGCODE_COMMIT=$(sed -n 's#.*/archive/\([0-9a-f]*\)\.zip$#\1#p' <<<"$line")
        echo "  $line -> installed from BIGCODE_EVAL_SOURCE with --no-deps" ;;
    *github.com*) die "unexpected GitHub requirement in $REQ: $line" ;;
    *) echo "$line" >>"$WORK/requirements.txt" ;;
    esac
done <"$REQ"
case "$RELEASE" in
2.6.* | 2.7.* | 2.8.*)
    echo "  + psutil<7.2 (cerebras-appliance $RELEASE imports psutil._pslinux.pfullmem)"
    echo "psutil<7.2" >>"$WORK/requirements.txt" ;;
esac

"$PY" -m pip install -q -r "$WORK/requirements.txt"
"$PY" -m pip install -q --no-deps -e "$MZ"
if [ -n "$BIGCODE" ]; then
    if git -C "$BIGCODE" rev-parse HEAD >/dev/null 2>&1; then
        have=$(git -C "$BIGCODE" rev-parse HEAD)
        [ "$have" = "${BIGCODE_COMMIT:-$have}" ] || die "$BIGCODE is at $have; ModelZoo $RELEASE pins $BIGCODE_COMMIT"
    fi
    "$PY" -m pip install -q --no-deps "$BIGCODE"
else
    echo "  (no BIGCODE_EVAL_SOURCE: bigcode_eval not installed; ModelZoo pins commit ${BIGCODE_COMMIT:-?})"
fi
"$PY" -m pip check || echo "  (pip check above reports conflicts among ModelZoo's own pins; left as the release ships them)"

# This package, the way docs/modelzoo.md documents for an existing cluster environment; `pip freeze`
# before and after, kept in VENV, shows that nothing installed changed (lines removed = changed).
"$PY" -m pip freeze --all >"$VENV/freeze-modelzoo.txt"
"$PY" "$HERE/install_into_env.py" --venv "$VENV"
"$PY" -m pip freeze --all >"$VENV/freeze-with-sparse-lora.txt"
echo "pip freeze, ModelZoo $RELEASE environment -> with modelzoo-sparse-lora (- removed/changed, + added):"
diff "$VENV/freeze-modelzoo.txt" "$VENV/freeze-with-sparse-lora.txt" | grep '^[<>]' | sed 's/^</  -/; s/^>/  +/' || true
if diff "$VENV/freeze-modelzoo.txt" "$VENV/freeze-with-sparse-lora.txt" | grep -q '^<'; then
    die "installing modelzoo-sparse-lora changed the environment (lines marked -)"
fi
echo "ModelZoo $RELEASE environment ready: $VENV (nothing installed was changed)"
