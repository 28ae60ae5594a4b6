"""The module itself: version, constants, declarations, struct layout, errors,
and how the shared library is found."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qbm
from conftest import PYTHON_DIR, REPO_DIR

HEADER = REPO_DIR / "include" / "qbm.h"


def header_text() -> str:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found")
    return HEADER.read_text()


def test_version_matches_header_macros() -> None:
    text = header_text()
    major, minor, patch = (
        int(re.search(rf"#define QBM_VERSION_{k} (\d+)", text).group(1))  # type: ignore[union-attr]
        for k in ("MAJOR", "MINOR", "PATCH")
    )
    assert (qbm.VERSION_MAJOR, qbm.VERSION_MINOR, qbm.VERSION_PATCH) == (major, minor, patch)
    assert qbm.version() == f"{major}.{minor}.{patch}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", qbm.__version__)
    assert qbm.__version__ == qbm.version()


def test_constants_match_header() -> None:
    text = header_text()
    defines = dict(re.findall(r"#define QBM_(\w+) \(?([^)\n]+)\)?", text))
    for name in ("OPEN_RDWR", "OPEN_FORCE_SHARE", "BITMAP_DISABLED", "BITMAP_ENABLED", "BITMAP_IN_USE",
                 "BITMAP_UNSUPPORTED", "IMAGE_WRITABLE", "NAME_MAX"):
        assert getattr(qbm, name) == eval(defines[name]), name  # "1 << 2" etc.


def test_every_header_function_is_declared() -> None:
    text = header_text()
    names = set(re.findall(r"\b(qbm_\w+)\(", text)) - {"qbm_image"}
    assert names, "no functions found in the header"
    for name in sorted(names):
        fn = getattr(qbm.lib, name)
        assert fn.restype is not None, name
        assert fn.argtypes is not None, name
    assert names == set(qbm._PROTOTYPES)


def test_last_error_is_a_str() -> None:
    assert isinstance(qbm.last_error(), str)


def test_failed_call_sets_last_error(img: qbm.Image) -> None:
    with pytest.raises(qbm.BitmapNotFound):
        img.remove_bitmap("no-such")
    assert "no-such" in qbm.last_error()


LAYOUT_C = r"""
#include <stdio.h>
#include <stddef.h>
#include "qbm.h"
#define F(s, f) printf(#s "." #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define S(s) printf(#s " %zu %zu\n", sizeof(struct s), _Alignof(struct s))
int main(void) {
    S(qbm_create_options); F(qbm_create_options, struct_size); F(qbm_create_options, virtual_size);
    F(qbm_create_options, cluster_size); F(qbm_create_options, refcount_bits); F(qbm_create_options, flags);
    S(qbm_image_info); F(qbm_image_info, struct_size); F(qbm_image_info, virtual_size);
    F(qbm_image_info, cluster_size); F(qbm_image_info, refcount_bits); F(qbm_image_info, version);
    F(qbm_image_info, bitmap_count); F(qbm_image_info, flags);
    S(qbm_bitmap_info); F(qbm_bitmap_info, struct_size); F(qbm_bitmap_info, name);
    F(qbm_bitmap_info, granularity); F(qbm_bitmap_info, flags); F(qbm_bitmap_info, extra_data_size);
    F(qbm_bitmap_info, dirty_bytes);
    S(qbm_range); F(qbm_range, offset); F(qbm_range, length);
    return 0;
}
"""


def test_structs_match_the_c_layout(tmp_path: Path) -> None:
    header_text()
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler to check the struct layout against")
    src = tmp_path / "layout.c"
    src.write_text(LAYOUT_C)
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=c11", "-I", str(HEADER.parent), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    structs = {
        "qbm_create_options": qbm._CreateOptions,
        "qbm_image_info": qbm._ImageInfo,
        "qbm_bitmap_info": qbm._BitmapInfo,
        "qbm_range": qbm._Range,
    }
    for line in out.splitlines():
        what, a, b = line.split()
        if "." in what:
            s, f = what.split(".")
            field = getattr(structs[s], f)
            assert (field.offset, field.size) == (int(a), int(b)), what
        else:
            assert (ctypes.sizeof(structs[what]), ctypes.alignment(structs[what])) == (int(a), int(b)), what


@pytest.mark.parametrize(
    "cls,code,builtin",
    [
        (qbm.BitmapNotFound, errno.ENOENT, FileNotFoundError),
        (qbm.BitmapExists, errno.EEXIST, FileExistsError),
        (qbm.InvalidArgument, errno.EINVAL, ValueError),
        (qbm.ReadOnlyError, errno.EROFS, None),
        (qbm.Busy, errno.EBUSY, None),
        (qbm.NotSupported, errno.ENOTSUP, None),
        (qbm.Corrupt, errno.EUCLEAN, None),
        (qbm.NoSpace, errno.ENOSPC, None),
        (qbm.PermissionDenied, errno.EACCES, PermissionError),
        (qbm.QbmError, errno.EIO, None),
    ],
)
def test_errno_selects_the_exception_class(cls: type, code: int, builtin: "type | None") -> None:
    e = qbm._error(code, "disk.qcow2: something about 'b0'", "qbm_test")
    assert type(e) is cls
    assert isinstance(e, qbm.QbmError) and isinstance(e, OSError)
    if builtin is not None:
        assert isinstance(e, builtin)
    assert e.errno == code
    assert e.strerror == "disk.qcow2: something about 'b0'"
    assert "something about 'b0'" in str(e)
    assert e.function == "qbm_test"


def test_error_aliases() -> None:
    assert qbm.NotFound is qbm.BitmapNotFound
    assert qbm.AlreadyExists is qbm.BitmapExists


def test_check_passes_counts_through() -> None:
    assert qbm._check(0, "f") == 0
    assert qbm._check(1, "f") == 1
    with pytest.raises(qbm.Busy) as ei:
        qbm._check(-errno.EBUSY, "f")
    assert ei.value.errno == errno.EBUSY


# --- finding the library ------------------------------------------------------

LIBRARY = os.environ.get("QBM_LIBRARY")


def import_in_subprocess(env_extra: dict, pkg_parent: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QBM_LIBRARY", "LD_LIBRARY_PATH", "PYTHONPATH")}
    env.update(env_extra)
    code = "import qbm, sys; print(qbm.lib._name); print(qbm.version())"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=str(pkg_parent), env=env, capture_output=True, text=True
    )


def copy_package(dest: Path) -> Path:
    pkg = dest / "qbm"
    pkg.mkdir(parents=True)
    shutil.copy(PYTHON_DIR / "qbm" / "__init__.py", pkg / "__init__.py")
    return pkg


def needs_library() -> str:
    if not LIBRARY:
        pytest.skip("QBM_LIBRARY is not set")
    return LIBRARY


def test_qbm_library_env_is_used(tmp_path: Path) -> None:
    lib = needs_library()
    copy_package(tmp_path)
    p = import_in_subprocess({"QBM_LIBRARY": lib}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == lib


def test_bad_qbm_library_env_is_a_clear_import_error(tmp_path: Path) -> None:
    copy_package(tmp_path)
    # Even with a usable library next to the package, an explicit choice wins.
    if LIBRARY:
        shutil.copy(LIBRARY, tmp_path / "qbm" / "libqbm.so.0")
    p = import_in_subprocess({"QBM_LIBRARY": str(tmp_path / "nope.so")}, tmp_path)
    assert p.returncode != 0
    assert "ImportError" in p.stderr
    assert "QBM_LIBRARY" in p.stderr and "nope.so" in p.stderr


def test_library_next_to_the_package_is_found(tmp_path: Path) -> None:
    lib = needs_library()
    pkg = copy_package(tmp_path)
    shutil.copy(lib, pkg / "libqbm.so.0")
    p = import_in_subprocess({}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == str(pkg / "libqbm.so.0")


def test_library_on_the_system_path_is_found(tmp_path: Path) -> None:
    lib = needs_library()
    copy_package(tmp_path)
    libdir = tmp_path / "syslib"
    libdir.mkdir()
    shutil.copy(lib, libdir / "libqbm.so.0")
    p = import_in_subprocess({"LD_LIBRARY_PATH": str(libdir)}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1] == qbm.version()


def test_missing_library_is_a_clear_import_error(tmp_path: Path) -> None:
    copy_package(tmp_path)
    probe = import_in_subprocess({}, tmp_path)
    if probe.returncode == 0:
        pytest.skip(f"libqbm is installed on this system ({probe.stdout.splitlines()[0]})")
    assert "ImportError" in probe.stderr
    assert "libqbm.so.0" in probe.stderr and "QBM_LIBRARY" in probe.stderr
