#!/usr/bin/env bash
# Builds the coffer-agent and coffer-receiver Debian packages.
#
#   packaging/build-deb.sh
#
# Steps: release binaries; shell completions and man pages from each binary's clap
# definitions (`BIN completions SHELL`, `BIN man`) into target/packaging/; then
# `cargo deb --no-build` for each package (cargo-deb is installed if missing). The .deb
# files land in ${CARGO_TARGET_DIR:-target}/debian/. Any failing step stops the script
# with a message naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# Fixed location: the deb metadata names these files relative to the crates.
GEN=$ROOT/target/packaging
BINS=(coffer-agent coffer-receiver)

step() { echo "== $*" >&2; }
fail() { echo "build-deb: error: $*" >&2; exit 1; }

command -v cargo >/dev/null || fail "cargo not found: install Rust from https://rustup.rs"
for crate in agent receiver; do
  grep -q '^\[package.metadata.deb\]' "$crate/Cargo.toml" \
    || fail "$crate/Cargo.toml has no [package.metadata.deb]: paste packaging/debian/$crate-deb.toml into it"
done
if ! cargo deb --version >/dev/null 2>&1; then
  step "installing cargo-deb"
  cargo install cargo-deb --locked || fail "\`cargo install cargo-deb --locked\` failed"
fi

step "building release binaries"
cargo build --release --locked -p coffer-agent -p coffer-receiver \
  || fail "\`cargo build --release -p coffer-agent -p coffer-receiver\` failed"

rm -rf "$GEN"
mkdir -p "$GEN/completions" "$GEN/man"
for bin in "${BINS[@]}"; do
  exe=$TARGET/release/$bin
  [ -x "$exe" ] || fail "$exe is missing after the build"
  step "completions and man page for $bin"
  for shell in bash zsh fish; do
    case $shell in
      bash) out=$GEN/completions/$bin.bash ;;
      zsh) out=$GEN/completions/_$bin ;;
      fish) out=$GEN/completions/$bin.fish ;;
    esac
    "$exe" completions "$shell" > "$out" \
      || fail "\`$bin completions $shell\` failed (does $bin have the hidden completions subcommand?)"
    [ -s "$out" ] || fail "\`$bin completions $shell\` printed nothing"
  done
  "$exe" man > "$GEN/man/$bin.1" \
    || fail "\`$bin man\` failed (does $bin have the hidden man subcommand?)"
  [ -s "$GEN/man/$bin.1" ] || fail "\`$bin man\` printed nothing"
done

for bin in "${BINS[@]}"; do
  step "packaging $bin"
  cargo deb -p "$bin" --no-build || fail "\`cargo deb -p $bin --no-build\` failed"
done
step "done:"
ls -1 "$TARGET"/debian/*.deb
