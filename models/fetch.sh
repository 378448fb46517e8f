#!/usr/bin/env bash
# Puts the model files listed in MANIFEST.tsv into models/files/ and verifies their sha256.
#
# Where each file comes from, first hit wins:
#   1. models/files/ already holds it with the right sha256;
#   2. $ISOMESH_MODELS/<file>;
#   3. ../shared/models/<file> beside the repository;
#   4. its URL in MANIFEST.tsv (downloaded, then verified).
# A file found with the wrong sha256 is an error, never silently used.
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
  [[ -n "$found" ]] || fail "$file is missing: set ISOMESH_MODELS to a folder holding it (sha256 $sha), or ${rebuild}"
  echo "models/fetch.sh: $file <- $found ($licence)" >&2
done < "$here/MANIFEST.tsv"
