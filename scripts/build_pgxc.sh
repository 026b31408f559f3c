#!/usr/bin/env bash
# Build Postgres-XL or Postgres-XC once from its source tarball and cache the installed tree
# outside the checkout; print its bindir as the last line on stdout.
#
#   scripts/build_pgxc.sh xl|xc
#
# There is no package of either: tests against a real XC-family cluster need this build.
# XCHA_XL_BINDIR / XCHA_XC_BINDIR name an existing install to use instead (checked, not built).
# XCHA_XL_TARBALL / XCHA_XC_TARBALL override the source, found by default in shared/ beside
# the repository (../shared/xl/, ../shared/xc/ from the repository root).
# The cache is XCHA_CACHE_DIR, else /var/cache/xcha as root (PostgreSQL runs as an
# unprivileged user, who cannot enter /root), else ${XDG_CACHE_HOME:-~/.cache}/xcha; one
# directory per flavour and tarball hash, e.g. postgres-xl-<16 hex of sha256>.
#
# Exit status: 0 ready; 1 error (e.g. an XCHA_*_BINDIR that is not that flavour); 2 usage;
# 3 source tarball not found; 4 the build failed; 5 build tools are missing.
set -euo pipefail
# One block to the end of the file: bash parses it all before running any of it, so the file
# changing during a long build (a git pull) cannot change what runs.
{

who=${BUILD_PGXC_WHO:-build_pgxc}   # ./run sets "run" so messages read as its own
say() { echo "$who: $*" >&2; }
die() { local status=$1; shift; say "$*"; exit "$status"; }

[ $# -eq 1 ] || die 2 "usage: scripts/build_pgxc.sh xl|xc"
flavour=$1
repo_root=$(cd "$(dirname "$0")/.." && pwd)
shared=$(dirname "$repo_root")/shared
case "$flavour" in
    xl) product=Postgres-XL version=10r1.1 minutes=2 version_program=postgres
        tarball=${XCHA_XL_TARBALL:-$shared/xl/postgres-xl-$version.tar.xz}
        given_bindir=${XCHA_XL_BINDIR:-} bindir_var=XCHA_XL_BINDIR tarball_var=XCHA_XL_TARBALL
        binaries="initgtm gtm gtm_ctl gtm_proxy initdb pg_ctl postgres psql pg_basebackup
                  pg_rewind pgxc_clean pg_controldata" ;;
    xc) product=Postgres-XC version=1.2.1 minutes=2 version_program=initgtm
        tarball=${XCHA_XC_TARBALL:-$shared/xc/postgres-xc-$version.tar.xz}
        given_bindir=${XCHA_XC_BINDIR:-} bindir_var=XCHA_XC_BINDIR tarball_var=XCHA_XC_TARBALL
        # PostgreSQL 9.3 has no pg_rewind.
        binaries="initgtm gtm gtm_ctl gtm_proxy initdb pg_ctl postgres psql pg_basebackup
                  pgxc_clean pg_controldata" ;;
    *) die 2 "usage: scripts/build_pgxc.sh xl|xc (not '$flavour')" ;;
esac

# The installed tree must be that flavour: plain PostgreSQL would start and then fail on the
# first GTM or node statement, far from the cause. XC's postgres reports only the PostgreSQL
# version it is based on ("postgres (PostgreSQL) 9.3.2"); its initgtm names Postgres-XC.
check_flavour() {
    local bindir=$1 origin=$2 program=$version_program reported
    [ -x "$bindir/postgres" ] || die 1 "$origin: no executable $bindir/postgres"
    [ -x "$bindir/$program" ] || program=postgres
    reported=$("$bindir/$program" --version 2>&1) ||
        die 1 "$origin: $bindir/$program --version failed: $reported"
    case "$reported" in
        *"$product"*) ;;
        *) die "${3:-1}" "$origin: $bindir is not $product ($program --version says: $reported)" ;;
    esac
}

check_binaries() {
    local bindir=$1 origin=$2 name missing=""
    for name in $binaries; do
        [ -x "$bindir/$name" ] || missing="$missing $name"
    done
    [ -z "$missing" ] || die "${3:-1}" "$origin: missing in $bindir:$missing"
}

# As root, PostgreSQL programs run as the unprivileged XCHA_PG_USER: it must be able to reach
# and execute them (every directory above them world-executable).
check_usable() {
    local bindir=$1 user=${XCHA_PG_USER:-postgres}
    [ "$(id -u)" = 0 ] && id "$user" >/dev/null 2>&1 && command -v runuser >/dev/null || return 0
    # From /: a PostgreSQL 9.3 program fails when it cannot read its working directory.
    (cd / && runuser -u "$user" -- "$bindir/postgres" --version >/dev/null 2>&1) ||
        die 1 "OS user $user cannot run $bindir/postgres: make every directory on the way" \
              "world-executable (chmod o+x) or set XCHA_CACHE_DIR to a directory outside /root"
}

if [ -n "$given_bindir" ]; then
    check_flavour "$given_bindir" "$bindir_var=$given_bindir"
    check_binaries "$given_bindir" "$bindir_var=$given_bindir"
    check_usable "$given_bindir"
    echo "$given_bindir"
    exit 0
fi

if [ -n "${XCHA_CACHE_DIR:-}" ]; then
    cache_root=$XCHA_CACHE_DIR
elif [ "$(id -u)" = 0 ]; then
    cache_root=/var/cache/xcha
else
    cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/xcha
fi
mkdir -p "$cache_root"
chmod 755 "$cache_root" 2>/dev/null || true
cache_root=$(cd "$cache_root" && pwd)   # configure needs an absolute prefix

# No source here (a clone elsewhere than beside shared/): a complete build of this version
# cached by an earlier run is the same program; use the newest.
if [ ! -f "$tarball" ]; then
    for cached_marker in $(ls -t "$cache_root"/postgres-"$flavour"-*/.xcha-build-complete 2>/dev/null); do
        if grep -q "^$product $version from " "$cached_marker"; then
            dest=$(dirname "$cached_marker")
            say "$product source not found at $tarball: using the cached build $dest"
            check_binaries "$dest/bin" "cached $product"
            check_usable "$dest/bin"
            echo "$dest/bin"
            exit 0
        fi
    done
    die 3 "$product source not found at $tarball and no cached build: ${flavour^^} tests will be" \
          "skipped (set $tarball_var or $bindir_var)"
fi
hash=$(sha256sum "$tarball" | cut -c1-16)
name=postgres-$flavour-$hash
dest=$cache_root/$name
marker=$dest/.xcha-build-complete
log=$cache_root/$name.log

ready() { [ -f "$marker" ] && [ -x "$dest/bin/postgres" ]; }

finish() {
    check_binaries "$dest/bin" "cached $product"
    check_usable "$dest/bin"
    echo "$dest/bin"
    exit 0
}

# Fast path: no lock needed to read a complete cache entry (it appears by an atomic rename).
ready && finish

# One build at a time per tarball: a second invocation waits, then finds the cache ready.
exec 9>"$cache_root/$name.lock"
flock 9
ready && finish
# A directory without the marker is not ours to trust (e.g. made by hand): rebuild it. A
# staging directory left by a killed build is garbage: only the lock holder makes one.
rm -rf "$dest" "$cache_root/.$name.staging."*

missing_tools=""
for tool in gcc make bison flex perl; do
    command -v "$tool" >/dev/null 2>&1 || missing_tools="$missing_tools $tool"
done
# XC is configured --without-zlib; XL links libz.
if [ "$flavour" = xl ] && ! echo '#include <zlib.h>' | cpp >/dev/null 2>&1; then
    missing_tools="$missing_tools zlib-headers(zlib1g-dev)"
fi
[ -z "$missing_tools" ] ||
    die 5 "cannot build $product: missing build tools:$missing_tools" \
          "(apt-get install gcc make bison flex perl libc6-dev zlib1g-dev)"

work=$(mktemp -d "${TMPDIR:-/tmp}/xcha-build-$flavour.XXXXXX")
staging=$cache_root/.$name.staging.$$
cleanup() { rm -rf "$work" "$staging"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building $product $version into $dest (about $minutes minutes, once; log: $log)"
start=$SECONDS
: >"$log"

fail() {
    {
        echo "---- last 30 lines of $log ----"
        tail -n 30 "$log"
        echo "----"
    } >&2
    die 4 "building $product failed: $* (full log: $log)"
}

# Run a build step with its output in the log only.
step() {
    echo "+ $*" >>"$log"
    "$@" >>"$log" 2>&1
}

jobs=$(nproc 2>/dev/null || echo 2)
step tar -xJf "$tarball" -C "$work" || fail "cannot unpack $tarball"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -n "$src" ] && [ -x "$src/configure" ] || fail "no configure script in $tarball"
cd "$src"

# Insert a line before/after the first line matching a fixed string, and verify it landed.
insert_line() {
    local file=$1 where=$2 anchor=$3 line=$4
    grep -qF "$anchor" "$file" || fail "source fix: '$anchor' not found in $file"
    ANCHOR=$anchor LINE=$line WHERE=$where perl -i -pe '
        if (!$done && index($_, $ENV{ANCHOR}) >= 0) {
            $_ = $ENV{WHERE} eq "before" ? "$ENV{LINE}\n$_" : "$_$ENV{LINE}\n"; $done = 1 }' "$file"
    grep -qF "$line" "$file" || fail "source fix: could not add '$line' to $file"
}

case "$flavour" in
xl)
    # pgxc_ctl needs readline to link, and it only scripts cluster setup: leave it out, so
    # that every other build failure is a real one.
    sed -i '/^[[:space:]]*pgxc_ctl[[:space:]]*\\$/d' src/bin/Makefile
    ! grep -q pgxc_ctl src/bin/Makefile || fail "could not drop pgxc_ctl from src/bin/Makefile"
    # GCC 10 and later default to -fno-common, and XL has duplicate tentative definitions of
    # globals: -fcommon, or linking fails. The tarball is a git export: the grammars are
    # generated here, hence bison and flex.
    step ./configure --prefix="$dest" --without-readline CFLAGS="-O1 -fcommon" ||
        fail "configure failed"
    step make -j"$jobs" || fail "make failed"
    step make install DESTDIR="$work/root" || fail "make install failed"
    ;;
xc)
    # flex 2.6 keeps an existing yylex macro (bison's "#define yylex base_yylex"), so
    # scan.c would redefine base_yylex with conflicting types.
    insert_line src/backend/parser/gram.y before '#include "scan.c"' '#undef yylex'
    # superuser() is used in gram.y without its declaration.
    insert_line src/backend/parser/gram.y after '#include "postgres.h"' '#include "miscadmin.h"'
    # Without it heap_form_tuple() is implicitly declared: its 64-bit pointer result is
    # truncated to int and the coordinator crashes on every CREATE TABLE.
    insert_line src/backend/catalog/pgxc_class.c after '#include "access/heapam.h"' \
        '#include "access/htup_details.h"'
    insert_line src/backend/pgxc/nodemgr/groupmgr.c after '#include "access/heapam.h"' \
        '#include "access/htup_details.h"'
    # FLEX=: configure's version test misreads flex 2.6.4 as older than 2.5.31. The other
    # flags keep modern GCC from miscompiling 2014 code (e.g. loop optimisations that assume
    # no signed overflow); -fcommon as for XL.
    step ./configure --prefix="$dest" --without-readline --without-zlib FLEX="$(command -v flex)" \
        CFLAGS="-O1 -fcommon -fno-aggressive-loop-optimizations -fno-strict-aliasing -fwrapv -std=gnu99 -Wno-error" ||
        fail "configure failed"
    # A first parallel pass can fail in src/common before utils/errcodes.h exists; the
    # second pass then has everything it needs.
    step make -j"$jobs" -k || step make -j"$jobs" || fail "make failed"
    step make install DESTDIR="$work/root" || fail "make install failed"
    step make -C contrib/pgxc_clean install DESTDIR="$work/root" || fail "building pgxc_clean failed"
    ;;
esac

# An implicitly declared function returns int: a pointer result is silently truncated and
# the server crashes later at run time. Treat it as the error it is.
if grep -q "implicit declaration of function" "$log"; then
    grep "implicit declaration of function" "$log" | sort -u | head -n 20 >&2
    fail "the compiler reported implicit declarations of functions (listed above)"
fi

# Move the tree into the cache's file system, then into place with one rename: an
# interrupted build never leaves a half-filled cache entry.
[ -d "$work/root$dest/bin" ] || fail "make install produced no $dest/bin"
check_binaries "$work/root$dest/bin" "$product build" 4
check_flavour "$work/root$dest/bin" "$product build" 4
mv "$work/root$dest" "$staging"
chmod -R u+rwX,go+rX,go-w "$staging"
echo "$product $version from $tarball ($(sha256sum "$tarball" | cut -d' ' -f1)), built $(date -u +%FT%TZ)" \
    >"$staging/.xcha-build-complete"
mv -T "$staging" "$dest"
chmod 644 "$log"
say "built $product $version in $((SECONDS - start)) s: $dest/bin"
finish
}
