#!/bin/sh
# Rewrites store-layout1.redb and store-layout1.json with the store code of
# commit $1 (default: the commit that defines layout 1 and wrote the
# committed fixture). The commit's source is unpacked into a temporary
# directory with `git archive`, make_store_fixture.rs is added to it as an
# example of the integration-tests crate, and run there; finally that
# commit's own `screener store check` must call the file healthy.
#
# Only needed to re-create the fixture; the test reads the committed files.
set -eu
commit=${1:-90434f4}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$repo" archive "$commit" | tar -x -C "$tmp"
mkdir -p "$tmp/tests/examples"
cp "$here/make_store_fixture.rs" "$tmp/tests/examples/make_store_fixture.rs"
# A target directory of its own: the old commit's `screener` binary must not
# replace target/debug/screener, which the integration tests run.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/store-fixture}"
cd "$tmp"
cargo run -q -p integration-tests --example make_store_fixture -- \
    "$tmp/store-layout1.redb" "$tmp/store-layout1.json"
printf '[store]\npath = "%s"\n' "$tmp/store-layout1.redb" >"$tmp/check.toml"
cargo run -q -p screener --bin screener -- -c "$tmp/check.toml" store check \
    | tee "$tmp/check.txt"
tail -n 1 "$tmp/check.txt" | grep -qx healthy
cp "$tmp/store-layout1.redb" "$tmp/store-layout1.json" "$here/"
echo "wrote $here/store-layout1.redb and $here/store-layout1.json from $commit"
