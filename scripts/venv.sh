# Sourced by scripts: makes sure the Python environment of the packaging checks exists and
# matches tests/packaging/requirements.txt (pinned), then sets $PY to its interpreter.
venv=${CHORUS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus-venv}
req=tests/packaging/requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (pinned packaging tools)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
PY=$venv/bin/python
