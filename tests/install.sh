#!/usr/bin/env bash
# `make install` as a packager and a user meet it (wired as `make check-install`;
# run from the repository root after `make lib`):
#
#   1. make install PREFIX=$tmp/prefix, and DESTDIR=$tmp/dest PREFIX=/usr:
#      the versioned library and its links, the SONAME, the static library,
#      the header, qbm.pc and the qbm binary land where they should;
#   2. a C program built with `pkg-config --cflags --libs qbm` against the
#      install compiles, links and runs (and once more statically, with
#      `pkg-config --static`);
#   3. the Python binding installs with `pip install ./python` into a fresh
#      virtual environment and finds the installed libqbm.so.0 without
#      QBM_LIBRARY.
#
# Every check runs; the failures are listed at the end and the exit code is 1
# if there was any. Environment: MAKE (default make), CC (default cc),
# PYTHON (default python3), KEEP_TMP=1 keeps the temporary directory.
set -euo pipefail

MAKE=${MAKE:-make}
CC=${CC:-cc}
PYTHON=${PYTHON:-python3}

if [[ ! -f Cargo.toml || ! -f Makefile || ! -f include/qbm.h ]]; then
    echo "install.sh: run me from the repository root" >&2
    exit 1
fi

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR=${VERSION%%.*}
SONAME=libqbm.so.$MAJOR
REPO=$PWD

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qbm-install.XXXXXX")
cleanup() {
    if [[ ${KEEP_TMP:-} == 1 ]]; then
        echo "install.sh: kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

failures=()
pass() { echo "  ok: $*"; }
fail() {
    echo "  FAIL: $*" >&2
    failures+=("$*")
}
section() { echo "== $*"; }

# check_layout ROOT LIBDIR_UNDER_ROOT INCLUDEDIR BINDIR PREFIX_IN_PC
check_layout() {
    local root=$1 libdir=$2 incdir=$3 bindir=$4 pcprefix=$5
    local lib=$root$libdir

    # libqbm.so -> libqbm.so.0 -> libqbm.so.X.Y.Z (relative links).
    if [[ -f $lib/libqbm.so.$VERSION && ! -L $lib/libqbm.so.$VERSION ]]; then
        pass "$lib/libqbm.so.$VERSION is a file"
    else
        fail "$lib/libqbm.so.$VERSION is missing or not a regular file"
    fi
    if [[ -L $lib/$SONAME && $(readlink "$lib/$SONAME") == "libqbm.so.$VERSION" ]]; then
        pass "$SONAME -> libqbm.so.$VERSION"
    else
        fail "$lib/$SONAME is not a link to libqbm.so.$VERSION ($(readlink "$lib/$SONAME" 2>&1 || true))"
    fi
    if [[ -L $lib/libqbm.so && $(readlink "$lib/libqbm.so") == "$SONAME" ]]; then
        pass "libqbm.so -> $SONAME"
    else
        fail "$lib/libqbm.so is not a link to $SONAME ($(readlink "$lib/libqbm.so" 2>&1 || true))"
    fi
    if [[ -e $lib/libqbm.so && -x $lib/libqbm.so.$VERSION ]]; then
        pass "the links resolve; the library is executable"
    else
        fail "$lib/libqbm.so does not resolve or libqbm.so.$VERSION is not executable"
    fi

    local soname
    soname=$(readelf -d "$lib/libqbm.so.$VERSION" 2>/dev/null |
        sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
    if [[ $soname == "$SONAME" ]]; then
        pass "SONAME $soname"
    else
        fail "$lib/libqbm.so.$VERSION has SONAME '${soname}', not $SONAME"
    fi
    # The exported C ABI is there.
    local sym
    for sym in qbm_version qbm_create qbm_open qbm_close qbm_mark_dirty qbm_bitmap_add; do
        if ! nm -D --defined-only "$lib/libqbm.so.$VERSION" 2>/dev/null | grep -qw "$sym"; then
            fail "$lib/libqbm.so.$VERSION does not export $sym"
        fi
    done

    if [[ -f $lib/libqbm.a ]] && ar t "$lib/libqbm.a" >/dev/null 2>&1; then
        pass "libqbm.a"
    else
        fail "$lib/libqbm.a is missing or not an archive"
    fi
    if [[ -f $root$incdir/qbm.h ]] && cmp -s "$root$incdir/qbm.h" include/qbm.h; then
        pass "$root$incdir/qbm.h"
    else
        fail "$root$incdir/qbm.h is missing or differs from include/qbm.h"
    fi

    local pc=$lib/pkgconfig/qbm.pc
    if [[ -f $pc ]]; then
        pass "$pc"
        grep -qx "prefix=$pcprefix" "$pc" || fail "$pc: prefix is not $pcprefix: $(grep '^prefix=' "$pc" || true)"
        grep -qx "libdir=$libdir" "$pc" || fail "$pc: libdir is not $libdir: $(grep '^libdir=' "$pc" || true)"
        grep -qx "includedir=$incdir" "$pc" || fail "$pc: includedir is not $incdir: $(grep '^includedir=' "$pc" || true)"
        grep -qx "Version: $VERSION" "$pc" || fail "$pc: Version is not $VERSION"
        if grep -q "$tmp/dest" "$pc"; then
            fail "$pc mentions the DESTDIR staging directory"
        fi
    else
        fail "$pc is missing"
    fi

    local bin=$root$bindir/qbm
    if [[ -x $bin && -f $bin ]]; then
        pass "$bin"
        local v
        if v=$("$bin" --version 2>&1) && [[ $v == "qbm $VERSION" ]]; then
            pass "qbm --version: $v"
        else
            fail "$bin --version printed '$v', not 'qbm $VERSION'"
        fi
    else
        fail "$bin is missing: make install does not install the qbm binary"
    fi
}

# --------------------------------------------------------------------------
section "make install PREFIX=$tmp/prefix"
prefix=$tmp/prefix
if $MAKE --no-print-directory install PREFIX="$prefix" >"$tmp/install.log" 2>&1; then
    pass "make install"
else
    cat "$tmp/install.log" >&2
    fail "make install PREFIX=$prefix failed"
fi
check_layout "" "$prefix/lib" "$prefix/include" "$prefix/bin" "$prefix"

# --------------------------------------------------------------------------
section "make install DESTDIR=$tmp/dest PREFIX=/usr"
dest=$tmp/dest
if $MAKE --no-print-directory install DESTDIR="$dest" PREFIX=/usr >"$tmp/install-dest.log" 2>&1; then
    pass "make install DESTDIR"
else
    cat "$tmp/install-dest.log" >&2
    fail "make install DESTDIR=$dest PREFIX=/usr failed"
fi
check_layout "$dest" /usr/lib /usr/include /usr/bin /usr
# Nothing outside DESTDIR: everything staged is under $dest/usr.
if stray=$(find "$dest" -mindepth 1 -maxdepth 1 ! -name usr | head -5) && [[ -n $stray ]]; then
    fail "DESTDIR install wrote outside $dest/usr: $stray"
fi

# --------------------------------------------------------------------------
section "a C program built with pkg-config against the install"
cat >"$tmp/x.c" <<'EOF'
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <qbm.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: x IMAGE\n");
        return 2;
    }
    struct qbm_create_options opts;
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.virtual_size = UINT64_C(64) << 20;
    struct qbm_image *img = NULL;
    int rc = qbm_create(argv[1], &opts, &img);
    if (rc < 0) {
        fprintf(stderr, "qbm_create: %s\n", qbm_last_error());
        return 1;
    }
    rc = qbm_bitmap_add(img, "from-c", 0, 0);
    if (rc == 0)
        rc = qbm_bitmap_set(img, "from-c", UINT64_C(1) << 20, 65536);
    if (rc < 0) {
        fprintf(stderr, "bitmap: %s\n", qbm_last_error());
        qbm_close(img);
        return 1;
    }
    if (qbm_close(img) < 0) {
        fprintf(stderr, "qbm_close: %s\n", qbm_last_error());
        return 1;
    }
    printf("%s\n", qbm_version());
    return 0;
}
EOF

if ! command -v pkg-config >/dev/null; then
    fail "pkg-config is not installed: cannot check qbm.pc (install pkg-config)"
else
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    if flags=$(pkg-config --cflags --libs qbm 2>"$tmp/pc.err"); then
        pass "pkg-config --cflags --libs qbm: $flags"
        # shellcheck disable=SC2086 # pkg-config output is word-split on purpose
        if $CC -std=c11 -Wall -Wextra -Wpedantic -Werror -o "$tmp/x" "$tmp/x.c" $flags 2>"$tmp/cc.err"; then
            pass "compiled and linked"
            if readelf -d "$tmp/x" | grep -q "NEEDED.*\[$SONAME\]"; then
                pass "the program needs $SONAME"
            else
                fail "the program does not record NEEDED $SONAME"
            fi
            if out=$(cd "$tmp" && LD_LIBRARY_PATH=$prefix/lib ./x c.qcow2 2>&1) && [[ $out == "$VERSION" ]]; then
                pass "ran: qbm_version() = $out"
            else
                fail "the C program failed or printed '$out', not '$VERSION'"
            fi
            if [[ -x $prefix/bin/qbm ]]; then
                if ext=$("$prefix/bin/qbm" extents "$tmp/c.qcow2" from-c 2>&1) && [[ $ext == "1048576 65536" ]]; then
                    pass "the installed qbm reads the C program's image"
                else
                    fail "installed qbm extents of the C program's image: '$ext'"
                fi
            fi
        else
            cat "$tmp/cc.err" >&2
            fail "cc x.c \$(pkg-config --cflags --libs qbm) failed"
        fi
        # Statically: libqbm.a and what `pkg-config --static` adds must do.
        # shellcheck disable=SC2046
        if $CC -o "$tmp/xs" "$tmp/x.c" $(pkg-config --cflags qbm) "$prefix/lib/libqbm.a" \
            $(pkg-config --static --libs-only-l qbm | sed 's/-lqbm\b//') 2>"$tmp/ccs.err"; then
            if out=$(cd "$tmp" && env -u LD_LIBRARY_PATH ./xs s.qcow2 2>&1) && [[ $out == "$VERSION" ]]; then
                pass "static link with pkg-config --static: ran, $out"
            else
                fail "the statically linked program failed: $out"
            fi
        else
            cat "$tmp/ccs.err" >&2
            fail "linking libqbm.a with \$(pkg-config --static --libs qbm) failed (Libs.private incomplete?)"
        fi
    else
        cat "$tmp/pc.err" >&2
        fail "pkg-config --cflags --libs qbm failed with PKG_CONFIG_PATH=$PKG_CONFIG_PATH"
    fi
    unset PKG_CONFIG_PATH
fi

# --------------------------------------------------------------------------
section "pip install ./python into a fresh virtual environment"
if [[ ! -f python/pyproject.toml && ! -f python/setup.py ]]; then
    fail "python/ has no pyproject.toml or setup.py: the binding cannot be pip-installed"
else
    # Build from a copy so no build/ or *.egg-info is left in the source tree,
    # and without any libqbm.so a developer may have dropped into python/qbm/
    # (the installed library must be the one found).
    mkdir -p "$tmp/src"
    cp -r python "$tmp/src/python"
    rm -rf "$tmp/src/python/qbm/"libqbm.so* "$tmp/src/python/build" "$tmp/src/python/"*.egg-info
    if "$PYTHON" -m venv "$tmp/venv" >"$tmp/venv.log" 2>&1; then
        pip_ok=0
        if (cd "$tmp/src" && "$tmp/venv/bin/pip" install --quiet ./python) >"$tmp/pip.log" 2>&1; then
            pip_ok=1
            pass "pip install ./python"
        elif (cd "$tmp/src" && "$tmp/venv/bin/pip" install --quiet --no-build-isolation ./python) >>"$tmp/pip.log" 2>&1; then
            pip_ok=1
            pass "pip install --no-build-isolation ./python (plain pip install failed: no index?)"
        else
            cat "$tmp/pip.log" >&2
            fail "pip install ./python failed"
        fi
        if [[ $pip_ok == 1 ]]; then
            if compgen -G "$tmp/venv/lib/python*/site-packages/qbm/libqbm.so*" >/dev/null; then
                fail "the wheel bundles a libqbm.so: the installed library is not what is tested"
            fi
            cat >"$tmp/probe.py" <<'EOF'
import os, sys
import qbm
print(qbm.version())
# Which libqbm the process loaded.
with open("/proc/self/maps") as f:
    libs = {l.split()[-1] for l in f if "libqbm" in l}
print(" ".join(sorted(libs)))
path = os.path.join(sys.argv[1], "py.qcow2")
with qbm.Image.create(path, 1 << 20) as img:
    img.add_bitmap("from-py")
    img.set_range("from-py", 0, 1)
with qbm.Image.open(path) as img:
    print(list(img.extents("from-py")))
EOF
            # From the temp dir (not the repo) so the source tree is not imported.
            if out=$(cd "$tmp" && env -u QBM_LIBRARY LD_LIBRARY_PATH="$prefix/lib" \
                "$tmp/venv/bin/python" "$tmp/probe.py" "$tmp" 2>&1); then
                mapfile -t lines <<<"$out"
                if [[ ${lines[0]} == "$VERSION" ]]; then
                    pass "import qbm; qbm.version() = ${lines[0]}"
                else
                    fail "qbm.version() printed '${lines[0]}', not '$VERSION'"
                fi
                if [[ ${lines[1]:-} == "$prefix/lib/"* ]]; then
                    pass "loaded ${lines[1]}"
                else
                    fail "the binding loaded '${lines[1]:-nothing}', not the library under $prefix/lib"
                fi
                if [[ ${lines[2]:-} == "[(0, 65536)]" ]]; then
                    pass "the binding creates and reads an image"
                else
                    fail "the binding's extents: '${lines[2]:-}'"
                fi
            else
                echo "$out" >&2
                fail "import qbm from the venv with LD_LIBRARY_PATH=$prefix/lib (no QBM_LIBRARY) failed"
            fi
            # And the plain `python -c` the issue names.
            if out=$(cd "$tmp" && env -u QBM_LIBRARY LD_LIBRARY_PATH="$prefix/lib" \
                "$tmp/venv/bin/python" -c 'import qbm; print(qbm.version())' 2>&1) &&
                [[ $out == "$VERSION" ]]; then
                pass "python -c 'import qbm; print(qbm.version())': $out"
            else
                fail "python -c 'import qbm; print(qbm.version())' printed: $out"
            fi
        fi
    else
        cat "$tmp/venv.log" >&2
        fail "$PYTHON -m venv failed"
    fi
fi

# --------------------------------------------------------------------------
echo
if ((${#failures[@]})); then
    echo "install.sh: ${#failures[@]} failure(s):" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "install.sh: all passed"
