#!/usr/bin/env bash
# Puts the model files listed in MANIFEST.tsv into models/files/ and verifies their sha256.
#
# Where each file comes from, first hit wins:
#   1. models/files/ already holds it with the right sha256;
#   2. $ISOMESH_MODELS/<file>;
#   3. ../shared/models/<file> beside the repository;
#   4. its URL in MANIFEST.tsv (downloaded, then verified);
#   5. for a file whose last column starts with "derive_onnx.py SOURCE" (the ONNX model, which has
#      no URL): derived from SOURCE, a file listed above it in MANIFEST.tsv and so already fetched,
#      by models/derive_onnx.py in a venv of the pinned models/requirements-derive.txt that this
#      script makes under models/.venv-derive (needs python3 with venv and PyPI; a few minutes the
#      first time), then verified against the same sha256 as any other source.
# A file found, downloaded or derived with the wrong sha256 is an error, never silently used.
# ISOMESH_PYTHON names the python for that venv (default: python3.11 if present, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
dest="$here/files"
mkdir -p "$dest"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

fail() {
  echo "models/fetch.sh: $*" >&2
  exit 1
}

# derive FILE SHA FROM: makes $dest/FILE from $dest/FROM with derive_onnx.py, or fails.
derive() {
  local file="$1" sha="$2" from="$3"
  local venv="$here/.venv-derive" reqs="$here/requirements-derive.txt"
  local target="$dest/$file" hint="instead, put $file (sha256 $sha) in \$ISOMESH_MODELS (see models/README.md)"
  [[ -f "$dest/$from" ]] || fail "$file is derived from $from, which is missing from $dest; $hint"
  if [[ ! -x "$venv/bin/python" ]]; then
    local py="${ISOMESH_PYTHON:-}"
    if [[ -z "$py" ]]; then
      if command -v python3.11 >/dev/null; then py=python3.11; else py=python3; fi
    fi
    command -v "$py" >/dev/null || fail "$file must be derived from $from, which needs Python 3 ($py not found); $hint"
    echo "models/fetch.sh: making the venv $venv with $py to derive $file" >&2
    "$py" -m venv "$venv" </dev/null || { rm -rf "$venv"; fail "could not make the venv $venv with $py (Debian/Ubuntu: apt-get install python3-venv); $hint"; }
  fi
  local want_stamp got_stamp=""
  want_stamp="$(sha_of "$reqs")"
  [[ -f "$venv/.requirements.sha256" ]] && got_stamp="$(cat "$venv/.requirements.sha256")"
  if [[ "$got_stamp" != "$want_stamp" ]]; then
    echo "models/fetch.sh: installing the pinned tools of requirements-derive.txt into $venv (log: $venv/pip.log)" >&2
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -r "$reqs" </dev/null >"$venv/pip.log" 2>&1; then
      tail -n 15 "$venv/pip.log" >&2
      fail "pip could not install models/requirements-derive.txt into $venv (see $venv/pip.log; the pins are for CPython 3.11 on x86_64 Linux: delete $venv and set ISOMESH_PYTHON to another python to retry); $hint"
    fi
    echo "$want_stamp" > "$venv/.requirements.sha256"
  fi
  echo "models/fetch.sh: deriving $file from $from with models/derive_onnx.py" >&2
  rm -f "$target.derived"
  "$venv/bin/python" "$here/derive_onnx.py" "$dest/$from" "$target.derived" </dev/null \
    || { rm -f "$target.derived"; fail "models/derive_onnx.py failed to derive $file (its error is above); $hint"; }
  local got
  got="$(sha_of "$target.derived")"
  if [[ "$got" != "$sha" ]]; then
    rm -f "$target.derived"
    fail "$file derived from $from has sha256 $got, expected $sha: the pinned tools did not reproduce the published file (see models/README.md); $hint"
  fi
  mv "$target.derived" "$target"
}

while IFS=$'\t' read -r file sha bytes url licence rebuild; do
  [[ -z "$file" || "$file" == \#* ]] && continue
  target="$dest/$file"
  if [[ -f "$target" && "$(sha_of "$target")" == "$sha" ]]; then
    continue
  fi
  found=""
  for dir in "${ISOMESH_MODELS:-}" "$root/../shared/models"; do
    [[ -n "$dir" && -f "$dir/$file" ]] || continue
    got="$(sha_of "$dir/$file")"
    [[ "$got" == "$sha" ]] || fail "$dir/$file has sha256 $got but MANIFEST.tsv expects $sha; replace it with the file named in models/README.md"
    cp "$dir/$file" "$target.tmp" && chmod 644 "$target.tmp" && mv "$target.tmp" "$target"
    found="$dir/$file"
    break
  done
  if [[ -z "$found" && "$url" != "-" ]]; then
    src="${url%%#*}"
    command -v curl >/dev/null || fail "$file is missing and curl is not installed to download it from $src"
    echo "models/fetch.sh: downloading $file from $src" >&2
    curl -fsSL --retry 3 -o "$target.download" "$src" || fail "download of $file from $src failed; put the file in \$ISOMESH_MODELS instead"
    if [[ "$url" == *"#drop-first-line" ]]; then
      tail -n +2 "$target.download" > "$target.download2" && mv "$target.download2" "$target.download"
    fi
    got="$(sha_of "$target.download")"
    if [[ "$got" != "$sha" ]]; then
      rm -f "$target.download"
      fail "$file downloaded from $src has sha256 $got, expected $sha"
    fi
    mv "$target.download" "$target"
    found="$src"
  fi
  if [[ -z "$found" && "$url" == "-" && "$rebuild" == derive_onnx.py\ * ]]; then
    from="${rebuild#derive_onnx.py }"
    from="${from%%[: ]*}"
    derive "$file" "$sha" "$from"
    found="derived from $from by models/derive_onnx.py"
  fi
  [[ -n "$found" ]] || fail "$file is missing: set ISOMESH_MODELS to a folder holding it (sha256 $sha), or ${rebuild}"
  echo "models/fetch.sh: $file <- $found ($licence)" >&2
done < "$here/MANIFEST.tsv"
