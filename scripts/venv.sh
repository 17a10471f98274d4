# Sourced by scripts: makes sure the Python environments of the packaging checks exist and
# match their pinned requirements, then sets $PY to the interpreter of the first and exports
# $CHORUS_CHECKOV, the checkov command of the second (tests/packaging/test_checkov.py).
#   tests/packaging/requirements.txt          Helm 4's library, the Kubernetes schemas, pytest
#   tests/packaging/requirements-checkov.txt  checkov, in a venv of its own: its pins (an older
#                                             `packaging`, among others) conflict with the above
chorus_venv() {
  local venv=$1 req=$2 want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "setting up $venv (pinned tools of $req)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
  fi
}
venv=${CHORUS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus-venv}
chorus_venv "$venv" tests/packaging/requirements.txt
chorus_venv "$venv-checkov" tests/packaging/requirements-checkov.txt
PY=$venv/bin/python
export CHORUS_CHECKOV=$venv-checkov/bin/checkov
