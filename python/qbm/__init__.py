"""Python binding of libqbm: QEMU-compatible persistent dirty bitmaps for qcow2.

A thin :mod:`ctypes` layer over the C API in ``qbm.h`` (standard library only)::

    import qbm

    with qbm.Image.open("disk.qcow2", writable=True) as img:
        img.add_bitmap("backup-1")
        img.mark_dirty(1 << 20, 4096)        # on every guest write
        for offset, length in img.extents("backup-1"):
            ...

Every failing C call raises a :class:`QbmError` (an :class:`OSError`) whose
``errno`` is the positive errno and whose message is the library's own
(``qbm_last_error()``); subclasses let callers catch one kind of failure:
:class:`BitmapNotFound` (ENOENT, also a :class:`FileNotFoundError`),
:class:`BitmapExists` (EEXIST, also a :class:`FileExistsError`),
:class:`InvalidArgument` (EINVAL, also a :class:`ValueError`),
:class:`ReadOnlyError` (EROFS), :class:`Busy` (EBUSY),
:class:`NotSupported` (ENOTSUP), :class:`Corrupt` (EUCLEAN),
:class:`NoSpace` (ENOSPC) and :class:`PermissionDenied` (EACCES/EPERM, also a
:class:`PermissionError`).

The shared library is found through, in order: the ``QBM_LIBRARY`` environment
variable (a path), a ``libqbm.so.0`` next to this module, then the system's
library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import operator
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Type, Union

__all__ = [
    "__version__",
    "version",
    "last_error",
    "Image",
    "ImageInfo",
    "BitmapInfo",
    "CheckResult",
    "QbmError",
    "BitmapNotFound",
    "NotFound",
    "BitmapExists",
    "AlreadyExists",
    "InvalidArgument",
    "ReadOnlyError",
    "Busy",
    "NotSupported",
    "Corrupt",
    "NoSpace",
    "PermissionDenied",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "VERSION_PATCH",
    "OPEN_RDWR",
    "OPEN_FORCE_SHARE",
    "OPEN_WRITE_INTENT",
    "OPEN_LAZY",
    "BITMAP_RECOVERED",
    "BITMAP_DISABLED",
    "BITMAP_ENABLED",
    "BITMAP_IN_USE",
    "BITMAP_UNSUPPORTED",
    "IMAGE_WRITABLE",
    "CHECK_REPAIR_LEAKS",
    "CHECK_REMOVE_INCONSISTENT",
    "NAME_MAX",
]

#: Version of this binding (the Python package). The library's own version is
#: :func:`version`.
__version__ = "0.1.0"

StrPath = Union[str, "os.PathLike[str]", bytes, "os.PathLike[bytes]"]
Name = Union[str, bytes]

# --------------------------------------------------------------------------
# Constants, mirrored from qbm.h.

VERSION_MAJOR = 0
VERSION_MINOR = 1
VERSION_PATCH = 0

#: ``qbm_open`` flag: open read-write.
OPEN_RDWR = 1 << 0
#: ``qbm_open`` flag: read without image locks (like ``qemu-img -U``).
OPEN_FORCE_SHARE = 1 << 1
#: ``qbm_open`` flag: write-intent mode (marks durable; bitmaps survive a crash).
OPEN_WRITE_INTENT = 1 << 2
#: ``qbm_open`` flag: read bitmap data only when a call needs it (tools
#: that track no writes; :meth:`Image.mark_dirty` is refused).
OPEN_LAZY = 1 << 3
#: ``qbm_bitmap_add`` flag: the new bitmap starts disabled.
BITMAP_DISABLED = 1 << 0
#: ``qbm_bitmap_info.flags``: marked by every write.
BITMAP_ENABLED = 1 << 0
#: ``qbm_bitmap_info.flags``: found in use (inconsistent) at open.
BITMAP_IN_USE = 1 << 1
#: ``qbm_bitmap_info.flags``: carries extra data this version does not understand.
BITMAP_UNSUPPORTED = 1 << 2
#: ``qbm_bitmap_info.flags``: found in use at open but recovered (write-intent).
BITMAP_RECOVERED = 1 << 3
#: ``qbm_image_info.flags``: the image is open read-write.
IMAGE_WRITABLE = 1 << 0
#: ``qbm_check`` flag: lower the refcount of leaked clusters.
CHECK_REPAIR_LEAKS = 1 << 0
#: ``qbm_check`` flag: remove bitmaps found in use (inconsistent) at open.
CHECK_REMOVE_INCONSISTENT = 1 << 1
#: Longest bitmap name in bytes.
NAME_MAX = 1023

_U64_MAX = (1 << 64) - 1

# --------------------------------------------------------------------------
# Finding and loading the library.

_SONAME = "libqbm.so.0"


def _load_library() -> ctypes.CDLL:
    tried: List[str] = []

    env = os.environ.get("QBM_LIBRARY")
    if env:
        try:
            return ctypes.CDLL(env)
        except OSError as e:
            # An explicit choice that fails must not silently fall back.
            raise ImportError(f"qbm: cannot load QBM_LIBRARY={env!r}: {e}") from e

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), _SONAME)
    if os.path.exists(here):
        try:
            return ctypes.CDLL(here)
        except OSError as e:
            tried.append(f"{here}: {e}")
    else:
        tried.append(f"{here}: not found")

    candidates = []
    found = ctypes.util.find_library("qbm")
    if found:
        candidates.append(found)
    candidates.append(_SONAME)
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            tried.append(f"{name}: {e}")

    raise ImportError(
        "qbm: cannot find the libqbm shared library (" + _SONAME + "). Set "
        "QBM_LIBRARY to its path, put it next to the qbm package, or install "
        "it on the system library path. Tried: " + "; ".join(tried)
    )


# --------------------------------------------------------------------------
# The C structures.


class _CreateOptions(ctypes.Structure):
    """``struct qbm_create_options``."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("virtual_size", ctypes.c_uint64),
        ("cluster_size", ctypes.c_uint64),
        ("refcount_bits", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data_file", ctypes.c_char_p),
    ]


class _ImageInfo(ctypes.Structure):
    """``struct qbm_image_info``."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("virtual_size", ctypes.c_uint64),
        ("cluster_size", ctypes.c_uint64),
        ("refcount_bits", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("bitmap_count", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _BitmapInfo(ctypes.Structure):
    """``struct qbm_bitmap_info``."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("name", ctypes.c_char * (NAME_MAX + 1)),
        ("granularity", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("extra_data_size", ctypes.c_uint32),
        ("dirty_bytes", ctypes.c_uint64),
    ]


class _Range(ctypes.Structure):
    """``struct qbm_range``: one write of a :meth:`Image.mark_dirty_many` batch."""

    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _CheckResult(ctypes.Structure):
    """``struct qbm_check_result``."""

    _fields_ = [("struct_size", ctypes.c_size_t)] + [
        (name, ctypes.c_uint64)
        for name in (
            "corruptions",
            "leaks",
            "check_errors",
            "leaks_fixed",
            "inconsistent_bitmaps",
            "removed_bitmaps",
            "image_end_offset",
            "total_clusters",
            "allocated_clusters",
            "fragmented_clusters",
            "compressed_clusters",
        )
    ]


class _Handle(ctypes.Structure):
    """``struct qbm_image`` (opaque)."""


_HandleP = ctypes.POINTER(_Handle)
_u64p = ctypes.POINTER(ctypes.c_uint64)
_u32p = ctypes.POINTER(ctypes.c_uint32)
_int = ctypes.c_int
_str = ctypes.c_char_p
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

# name -> (restype, argtypes); every function of qbm.h.
_PROTOTYPES = {
    "qbm_version": (_str, []),
    "qbm_last_error": (_str, []),
    "qbm_open": (_int, [_str, _u32, ctypes.POINTER(_HandleP)]),
    "qbm_create": (_int, [_str, ctypes.POINTER(_CreateOptions), ctypes.POINTER(_HandleP)]),
    "qbm_flush": (_int, [_HandleP]),
    "qbm_close": (_int, [_HandleP]),
    "qbm_image_get_info": (_int, [_HandleP, ctypes.POINTER(_ImageInfo)]),
    "qbm_bitmap_count": (_int, [_HandleP, _u32p]),
    "qbm_bitmap_get_info": (_int, [_HandleP, _u32, ctypes.POINTER(_BitmapInfo)]),
    "qbm_bitmap_add": (_int, [_HandleP, _str, _u64, _u32]),
    "qbm_bitmap_remove": (_int, [_HandleP, _str]),
    "qbm_bitmap_clear": (_int, [_HandleP, _str]),
    "qbm_bitmap_enable": (_int, [_HandleP, _str]),
    "qbm_bitmap_disable": (_int, [_HandleP, _str]),
    "qbm_bitmap_rename": (_int, [_HandleP, _str, _str]),
    "qbm_bitmap_merge": (_int, [_HandleP, _str, _HandleP, _str]),
    "qbm_bitmap_set": (_int, [_HandleP, _str, _u64, _u64]),
    "qbm_bitmap_reset": (_int, [_HandleP, _str, _u64, _u64]),
    "qbm_mark_dirty": (_int, [_HandleP, _u64, _u64]),
    "qbm_mark_dirty_many": (_int, [_HandleP, ctypes.POINTER(_Range), ctypes.c_size_t]),
    "qbm_mark_dirty_nowait": (_int, [_HandleP, _u64, _u64]),
    "qbm_sync": (_int, [_HandleP]),
    "qbm_bitmap_dirty_bytes": (_int, [_HandleP, _str, _u64p]),
    "qbm_bitmap_next_extent": (_int, [_HandleP, _str, _u64, _u64p, _u64p]),
    "qbm_check": (_int, [_HandleP, _u32, ctypes.POINTER(_CheckResult)]),
    "qbm_image_get_data_file": (_int, [_HandleP, ctypes.c_char_p, ctypes.c_size_t]),
    "qbm_resize": (_int, [_HandleP, _u64]),
}


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for fname, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, fname)
        except AttributeError as e:
            raise ImportError(f"qbm: {lib._name} lacks {fname}; is it libqbm?") from e
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


#: The loaded shared library, every function of qbm.h declared with its
#: argtypes and restype (for callers who need the raw C API).
lib = _bind(_load_library())


def version() -> str:
    """The library's version, ``"MAJOR.MINOR.PATCH"`` (``qbm_version()``)."""
    v = lib.qbm_version()
    return v.decode("utf-8") if v else ""


def last_error() -> str:
    """The calling thread's message for its last failed C call (``""`` if none)."""
    m = lib.qbm_last_error()
    return m.decode("utf-8", "replace") if m else ""


_lib_major = version().split(".")[0]
if _lib_major != str(VERSION_MAJOR):
    raise ImportError(
        f"qbm: {lib._name} is libqbm {version()}, this binding needs major version {VERSION_MAJOR}"
    )

# --------------------------------------------------------------------------
# Errors.


class QbmError(OSError):
    """A libqbm call failed.

    ``errno`` is the positive errno the C call returned (negated); ``strerror``
    is the library's message (``qbm_last_error()``), which names the file, the
    bitmap and the offending value; ``function`` is the C function's name.
    """

    function: Optional[str] = None

    def __init__(self, errno: int, message: str, function: Optional[str] = None) -> None:
        super().__init__(errno, message)
        self.function = function


class BitmapNotFound(QbmError, FileNotFoundError):
    """ENOENT: no bitmap of that name (or no such image file)."""


class BitmapExists(QbmError, FileExistsError):
    """EEXIST: a bitmap of that name (or the image file) already exists."""


class InvalidArgument(QbmError, ValueError):
    """EINVAL: a bad argument (bad name, unaligned range, bad size, ...)."""


class ReadOnlyError(QbmError):
    """EROFS: a change was asked of an image opened read-only."""


class Busy(QbmError):
    """EBUSY: the image is locked, or the bitmap is in use or inconsistent."""


class NotSupported(QbmError):
    """ENOTSUP: a feature this version of libqbm does not implement."""


class Corrupt(QbmError):
    """EUCLEAN: the image's metadata is invalid."""


class NoSpace(QbmError):
    """ENOSPC: a limit of the format would be exceeded, or the disk is full."""


class PermissionDenied(QbmError, PermissionError):
    """EACCES/EPERM: the operating system refused access to the image file."""


#: Aliases with the shorter names.
NotFound = BitmapNotFound
AlreadyExists = BitmapExists

_ERRNO_CLASSES: Dict[int, Type[QbmError]] = {
    _errno.ENOENT: BitmapNotFound,
    _errno.EEXIST: BitmapExists,
    _errno.EINVAL: InvalidArgument,
    _errno.EROFS: ReadOnlyError,
    _errno.EBUSY: Busy,
    _errno.ENOTSUP: NotSupported,
    _errno.EOPNOTSUPP: NotSupported,
    _errno.EUCLEAN: Corrupt,
    _errno.ENOSPC: NoSpace,
    _errno.EACCES: PermissionDenied,
    _errno.EPERM: PermissionDenied,
}


def _error(code: int, message: str, function: Optional[str] = None) -> QbmError:
    cls = _ERRNO_CLASSES.get(code, QbmError)
    return cls(code, message, function)


def _check(ret: int, function: str) -> int:
    """Turns a negative errno from ``function`` into the matching exception."""
    if ret < 0:
        code = -ret
        message = last_error() or os.strerror(code)
        raise _error(code, message, function)
    return ret


# --------------------------------------------------------------------------
# Argument conversion (done in Python so that nothing is silently truncated).


def _name(name: Name, what: str = "bitmap name") -> bytes:
    if isinstance(name, str):
        b = name.encode("utf-8")
    elif isinstance(name, (bytes, bytearray)):
        b = bytes(name)
    else:
        raise TypeError(f"{what} must be str, not {type(name).__name__}")
    if b"\0" in b:
        raise InvalidArgument(_errno.EINVAL, f"{what} {name!r} contains a NUL character")
    return b


def _path(path: StrPath) -> bytes:
    b = os.fsencode(path)
    if b"\0" in b:
        raise InvalidArgument(_errno.EINVAL, f"path {path!r} contains a NUL character")
    return b


def _uint(value: int, what: str, limit: int = _U64_MAX) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None
    if v < 0 or v > limit:
        raise InvalidArgument(_errno.EINVAL, f"{what} {v} is out of range (0..{limit})")
    return v


# --------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class ImageInfo:
    """Facts about an open image (``struct qbm_image_info``)."""

    #: Virtual disk size in bytes.
    virtual_size: int
    #: Cluster size in bytes.
    cluster_size: int
    #: Refcount width in bits.
    refcount_bits: int
    #: qcow2 version: 2 or 3.
    version: int
    #: Number of bitmaps, usable or not.
    bitmap_count: int
    #: Whether the image is open read-write.
    writable: bool
    #: The external data file's name for a raw-disk companion, else None.
    data_file: Optional[str] = None


@dataclass(frozen=True)
class BitmapInfo:
    """One bitmap (``struct qbm_bitmap_info``)."""

    #: The bitmap's name.
    name: str
    #: Bytes of guest disk per bit.
    granularity: int
    #: Marked by every write (``auto`` on disk).
    enabled: bool
    #: Found in use (inconsistent) at open; it can only be removed.
    in_use: bool
    #: Carries extra data this version does not understand (kept, not usable).
    unsupported: bool
    #: Bytes of extra data in the directory entry.
    extra_data_size: int
    #: Dirty bytes (0 unless the bitmap is usable).
    dirty_bytes: int
    #: Found in use at open but recovered: it was in write-intent mode when
    #: its last user crashed, and nothing wrote the image since.
    recovered: bool = False


@dataclass(frozen=True)
class CheckResult:
    """What :meth:`Image.check` found (``struct qbm_check_result``), counted
    as ``qemu-img check`` counts it."""

    #: Clusters referenced more often than their refcount, and broken entries.
    corruptions: int
    #: Clusters whose refcount is above their references (after repair).
    leaks: int
    #: Metadata that could not be read.
    check_errors: int
    #: Leaked clusters repaired by this check.
    leaks_fixed: int
    #: Bitmaps flagged in use (inconsistent) that remain.
    inconsistent_bitmaps: int
    #: Inconsistent bitmaps removed by this check.
    removed_bitmaps: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int

    @property
    def consistent(self) -> bool:
        """No corruption and no check error (leaks are harmless)."""
        return self.corruptions == 0 and self.check_errors == 0


# --------------------------------------------------------------------------
# The image.


class Image:
    """An open qcow2 image and its persistent dirty bitmaps.

    Make one with :meth:`Image.open` or :meth:`Image.create`; use it as a
    context manager, or call :meth:`close`, which stores the bitmaps. Using a
    closed image raises :class:`ValueError`.

    :meth:`mark_dirty` may be called from many threads at once; other calls on
    one image are serialised inside the library.
    """

    __slots__ = ("_h", "_path", "__weakref__")

    def __init__(self, handle: "ctypes._Pointer[_Handle]", path: StrPath) -> None:
        # Internal: use Image.open() or Image.create().
        self._h: Optional["ctypes._Pointer[_Handle]"] = handle
        self._path = path

    # -- construction and lifetime -------------------------------------

    @classmethod
    def open(
        cls,
        path: StrPath,
        writable: bool = False,
        force_share: bool = False,
        write_intent: bool = False,
        lazy: bool = False,
    ) -> "Image":
        """Opens the qcow2 image at ``path``, read-only unless ``writable``.

        Opened read-write (and not ``lazy``), its bitmaps are flagged in_use
        on disk until :meth:`close`, as QEMU does. The image is locked as QEMU locks it
        (:class:`Busy` while a VM or qemu-img holds it); ``force_share``
        reads without locks, like ``qemu-img -U`` (read-only only).
        ``write_intent`` (with ``writable``): :meth:`mark_dirty` returns once
        the marked bits are durable, so the bitmaps survive a crash of this
        process (the next read-write open recovers them).
        ``lazy``, for backup and management tools: bitmap data is read only
        when a call needs it; extents, dirty counts, merges of equal
        granularity and clears work a chunk at a time, so memory and I/O
        follow what a call touches, not the disk size. Bitmaps are not
        flagged in_use and :meth:`mark_dirty` is refused.
        """
        p = _path(path)
        h = _HandleP()
        flags = (
            (OPEN_RDWR if writable else 0)
            | (OPEN_FORCE_SHARE if force_share else 0)
            | (OPEN_WRITE_INTENT if write_intent else 0)
            | (OPEN_LAZY if lazy else 0)
        )
        _check(lib.qbm_open(p, flags, ctypes.byref(h)), "qbm_open")
        return cls(h, path)

    @classmethod
    def create(
        cls,
        path: StrPath,
        size: int = 0,
        cluster_size: int = 65536,
        refcount_bits: int = 16,
        data_file: Optional[StrPath] = None,
    ) -> "Image":
        """Creates a new qcow2 v3 image of ``size`` bytes at ``path`` (which
        must not exist) and returns it open read-write.

        ``cluster_size``: a power of two from 512 to 2 MiB; ``refcount_bits``:
        1, 2, 4, 8, 16, 32 or 64. ``data_file``: an existing raw disk whose
        metadata companion the image becomes (its guest data stays in the raw
        file, which is never written); ``size`` 0 then means the raw file's
        size. Give an absolute path: QEMU resolves a relative one against its
        working directory.
        """
        p = _path(path)
        opts = _CreateOptions()
        opts.struct_size = ctypes.sizeof(_CreateOptions)
        opts.virtual_size = _uint(size, "size")
        opts.cluster_size = _uint(cluster_size, "cluster_size")
        opts.refcount_bits = _uint(refcount_bits, "refcount_bits", 0xFFFFFFFF)
        opts.flags = 0
        opts.data_file = None if data_file is None else _path(data_file)
        h = _HandleP()
        _check(lib.qbm_create(p, ctypes.byref(opts), ctypes.byref(h)), "qbm_create")
        return cls(h, path)

    def close(self) -> None:
        """Stores every bitmap (in_use cleared) and closes the image.

        Idempotent. The image is closed even if storing fails (the error is
        then raised).
        """
        h = self._h
        if h is None:
            return
        self._h = None
        _check(lib.qbm_close(h), "qbm_close")

    @property
    def closed(self) -> bool:
        """Whether the image has been closed."""
        return self._h is None

    @property
    def path(self) -> StrPath:
        """The path the image was opened or created with."""
        return self._path

    def __enter__(self) -> "Image":
        self._handle()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort: an image the caller forgot to close is still stored.
        try:
            if getattr(self, "_h", None) is not None:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._h is None else "open"
        return f"<qbm.Image {os.fsdecode(self._path)!r} {state}>"

    def _handle(self) -> "ctypes._Pointer[_Handle]":
        h = self._h
        if h is None:
            raise ValueError("I/O operation on closed qbm.Image")
        return h

    # -- image ---------------------------------------------------------

    def flush(self) -> None:
        """Stores every changed bitmap (they stay flagged in_use while open)."""
        h = self._handle()
        _check(lib.qbm_flush(h), "qbm_flush")

    def check(self, repair_leaks: bool = False, remove_inconsistent: bool = False) -> CheckResult:
        """Recomputes every cluster's references and compares them with the
        refcounts, as ``qemu-img check`` does. Repairs need a read-write image:
        ``repair_leaks`` fixes leaked clusters, ``remove_inconsistent`` removes
        bitmaps found in use at open (their content is lost for good)."""
        h = self._handle()
        flags = (CHECK_REPAIR_LEAKS if repair_leaks else 0) | (
            CHECK_REMOVE_INCONSISTENT if remove_inconsistent else 0
        )
        r = _CheckResult()
        r.struct_size = ctypes.sizeof(_CheckResult)
        _check(lib.qbm_check(h, flags, ctypes.byref(r)), "qbm_check")
        return CheckResult(**{name: getattr(r, name) for name, _ in _CheckResult._fields_[1:]})

    def resize(self, new_size: int) -> None:
        """Grows or shrinks the virtual disk (a multiple of 512) and every
        bitmap with it, as ``qemu-img resize`` does; bits past a shrunken end
        are dropped. Raises :class:`Busy` while a bitmap is inconsistent."""
        h = self._handle()
        _check(lib.qbm_resize(h, _uint(new_size, "new_size")), "qbm_resize")

    def info(self) -> ImageInfo:
        """Facts about the image."""
        h = self._handle()
        i = _ImageInfo()
        i.struct_size = ctypes.sizeof(_ImageInfo)
        _check(lib.qbm_image_get_info(h, ctypes.byref(i)), "qbm_image_get_info")
        return ImageInfo(
            virtual_size=i.virtual_size,
            cluster_size=i.cluster_size,
            refcount_bits=i.refcount_bits,
            version=i.version,
            bitmap_count=i.bitmap_count,
            writable=bool(i.flags & IMAGE_WRITABLE),
            data_file=self._data_file(h),
        )

    @staticmethod
    def _data_file(h: "ctypes._Pointer[_Handle]") -> Optional[str]:
        n = _check(lib.qbm_image_get_data_file(h, None, 0), "qbm_image_get_data_file")
        if n == 0:
            return None
        buf = ctypes.create_string_buffer(n + 1)
        _check(lib.qbm_image_get_data_file(h, buf, n + 1), "qbm_image_get_data_file")
        return os.fsdecode(buf.value)

    @property
    def writable(self) -> bool:
        """Whether the image is open read-write."""
        return self.info().writable

    # -- listing -------------------------------------------------------

    def bitmap_count(self) -> int:
        """The number of bitmaps, usable or not."""
        h = self._handle()
        n = ctypes.c_uint32()
        _check(lib.qbm_bitmap_count(h, ctypes.byref(n)), "qbm_bitmap_count")
        return n.value

    def bitmaps(self) -> List[BitmapInfo]:
        """Every bitmap, in directory order."""
        h = self._handle()
        out: List[BitmapInfo] = []
        for index in range(self.bitmap_count()):
            b = _BitmapInfo()
            b.struct_size = ctypes.sizeof(_BitmapInfo)
            _check(lib.qbm_bitmap_get_info(h, index, ctypes.byref(b)), "qbm_bitmap_get_info")
            out.append(
                BitmapInfo(
                    name=b.name.decode("utf-8", "surrogateescape"),
                    granularity=b.granularity,
                    enabled=bool(b.flags & BITMAP_ENABLED),
                    in_use=bool(b.flags & BITMAP_IN_USE),
                    unsupported=bool(b.flags & BITMAP_UNSUPPORTED),
                    extra_data_size=b.extra_data_size,
                    dirty_bytes=b.dirty_bytes,
                    recovered=bool(b.flags & BITMAP_RECOVERED),
                )
            )
        return out

    def bitmap(self, name: Name) -> BitmapInfo:
        """The bitmap called ``name``; :class:`BitmapNotFound` if none."""
        want = _name(name).decode("utf-8", "surrogateescape")
        for b in self.bitmaps():
            if b.name == want:
                return b
        raise BitmapNotFound(
            _errno.ENOENT, f"{os.fsdecode(self._path)}: bitmap '{want}' not found"
        )

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        try:
            self.bitmap(name)
        except BitmapNotFound:
            return False
        return True

    # -- management ----------------------------------------------------

    def add_bitmap(self, name: Name, granularity: Optional[int] = None, enabled: bool = True) -> None:
        """Adds an empty bitmap.

        ``granularity``: bytes per bit, a power of two from 512 to 2 GiB;
        ``None`` for QEMU's default (the cluster size within 4 KiB..64 KiB).
        ``enabled=False`` creates it disabled (not marked by :meth:`mark_dirty`).
        """
        h = self._handle()
        g = 0 if granularity is None else _uint(granularity, "granularity")
        flags = 0 if enabled else BITMAP_DISABLED
        _check(lib.qbm_bitmap_add(h, _name(name), g, flags), "qbm_bitmap_add")

    def remove_bitmap(self, name: Name) -> None:
        """Removes a bitmap (also an inconsistent one)."""
        h = self._handle()
        _check(lib.qbm_bitmap_remove(h, _name(name)), "qbm_bitmap_remove")

    def clear_bitmap(self, name: Name) -> None:
        """Clears every bit of a bitmap."""
        h = self._handle()
        _check(lib.qbm_bitmap_clear(h, _name(name)), "qbm_bitmap_clear")

    def enable_bitmap(self, name: Name) -> None:
        """Enables a bitmap: :meth:`mark_dirty` marks it."""
        h = self._handle()
        _check(lib.qbm_bitmap_enable(h, _name(name)), "qbm_bitmap_enable")

    def disable_bitmap(self, name: Name) -> None:
        """Disables (freezes) a bitmap: :meth:`mark_dirty` no longer marks it."""
        h = self._handle()
        _check(lib.qbm_bitmap_disable(h, _name(name)), "qbm_bitmap_disable")

    def rename_bitmap(self, old_name: Name, new_name: Name) -> None:
        """Renames bitmap ``old_name`` to ``new_name``."""
        h = self._handle()
        old = _name(old_name, "old bitmap name")
        new = _name(new_name, "new bitmap name")
        _check(lib.qbm_bitmap_rename(h, old, new), "qbm_bitmap_rename")

    def merge_bitmap(self, dst_name: Name, src_name: Name, src_image: Optional["Image"] = None) -> None:
        """ORs bitmap ``src_name`` of ``src_image`` (default: this image) into
        bitmap ``dst_name`` of this image. Granularities may differ; the disk
        sizes must match.
        """
        h = self._handle()
        if src_image is None:
            src = h
        elif isinstance(src_image, Image):
            src = src_image._handle()
        else:
            raise TypeError(f"src_image must be a qbm.Image, not {type(src_image).__name__}")
        dst_b = _name(dst_name, "destination bitmap name")
        src_b = _name(src_name, "source bitmap name")
        _check(lib.qbm_bitmap_merge(h, dst_b, src, src_b), "qbm_bitmap_merge")

    # -- bits ----------------------------------------------------------

    def set_range(self, name: Name, offset: int, length: int) -> None:
        """Marks every granule that ``[offset, offset+length)`` touches in one bitmap."""
        h = self._handle()
        o, n = _uint(offset, "offset"), _uint(length, "length")
        _check(lib.qbm_bitmap_set(h, _name(name), o, n), "qbm_bitmap_set")

    def reset_range(self, name: Name, offset: int, length: int) -> None:
        """Clears ``[offset, offset+length)`` in one bitmap. The range must start
        on a granule boundary and end on one or at the end of the disk.
        """
        h = self._handle()
        o, n = _uint(offset, "offset"), _uint(length, "length")
        _check(lib.qbm_bitmap_reset(h, _name(name), o, n), "qbm_bitmap_reset")

    def mark_dirty(self, offset: int, length: int) -> None:
        """Marks ``[offset, offset+length)`` dirty in every enabled bitmap.

        Safe to call from any number of threads at once.
        """
        h = self._handle()
        o, n = _uint(offset, "offset"), _uint(length, "length")
        _check(lib.qbm_mark_dirty(h, o, n), "qbm_mark_dirty")

    def mark_dirty_many(self, ranges: "List[Tuple[int, int]]") -> None:
        """Marks a batch of ``(offset, length)`` writes in one call, each as
        :meth:`mark_dirty` would. Every range is checked first: a bad one
        raises with nothing marked."""
        h = self._handle()
        ranges = list(ranges)
        arr = (_Range * max(len(ranges), 1))()
        for i, r in enumerate(ranges):
            try:
                offset, length = r
            except (TypeError, ValueError):
                raise TypeError(f"range {i} must be an (offset, length) pair, not {r!r}") from None
            arr[i] = _Range(_uint(offset, f"range {i} offset"), _uint(length, f"range {i} length"))
        _check(lib.qbm_mark_dirty_many(h, arr, len(ranges)), "qbm_mark_dirty_many")

    def mark_dirty_nowait(self, offset: int, length: int) -> bool:
        """Write-intent mode: marks without waiting; True when :meth:`sync`
        must run before the marked bits are durable."""
        h = self._handle()
        o, n = _uint(offset, "offset"), _uint(length, "length")
        return bool(_check(lib.qbm_mark_dirty_nowait(h, o, n), "qbm_mark_dirty_nowait"))

    def sync(self) -> None:
        """Write-intent mode: makes every mark that needed a sync durable."""
        _check(lib.qbm_sync(self._handle()), "qbm_sync")

    def dirty_bytes(self, name: Name) -> int:
        """The number of dirty bytes of a bitmap."""
        h = self._handle()
        n = ctypes.c_uint64()
        _check(lib.qbm_bitmap_dirty_bytes(h, _name(name), ctypes.byref(n)), "qbm_bitmap_dirty_bytes")
        return n.value

    def next_extent(self, name: Name, start: int = 0) -> Optional[Tuple[int, int]]:
        """The first dirty run ``(offset, length)`` at or after ``start``, or
        ``None`` if there is none.
        """
        return self._next_extent(self._handle(), _name(name), _uint(start, "start"))

    @staticmethod
    def _next_extent(h: "ctypes._Pointer[_Handle]", name: bytes, start: int) -> Optional[Tuple[int, int]]:
        off = ctypes.c_uint64()
        length = ctypes.c_uint64()
        r = _check(
            lib.qbm_bitmap_next_extent(h, name, start, ctypes.byref(off), ctypes.byref(length)),
            "qbm_bitmap_next_extent",
        )
        if r == 0:
            return None
        return off.value, length.value

    def extents(self, name: Name, start: int = 0) -> Iterator[Tuple[int, int]]:
        """Iterates over the dirty runs ``(offset, length)`` of a bitmap at or
        after ``start``, in ascending order, each rounded out to whole granules.

        The first run is looked up at once, so a missing bitmap raises here,
        not at the first ``next()``.
        """
        b = _name(name)
        first = self._next_extent(self._handle(), b, _uint(start, "start"))
        return self._extents_from(b, first)

    def _extents_from(self, name: bytes, ext: Optional[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
        # An empty run would make the walk loop forever; it is never yielded.
        while ext is not None and ext[1] > 0:
            yield ext
            nxt = ext[0] + ext[1]
            if nxt > _U64_MAX:
                return
            ext = self._next_extent(self._handle(), name, nxt)
