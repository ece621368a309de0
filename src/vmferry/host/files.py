"""Files a control request names (snapshots, stream copies), confined to the images directory.

A request gives a path; it is taken relative to the host's images directory
(``--images-dir``, default ``<state-dir>/images``), and an absolute path is accepted only
when it lies inside it.  The path is then opened one component at a time from a file
descriptor of the directory, every component with ``O_NOFOLLOW``: a symbolic link or a
``..`` anywhere cannot lead out, whatever the file system holds at the moment of the open.

* reading (:meth:`ImagesDir.open_read`): regular files only (a FIFO or device is refused
  without blocking, ``O_NONBLOCK``);
* writing (:meth:`ImagesDir.create`): a new temporary file beside the target, renamed over
  it by :meth:`Output.commit` only once everything was written and synced; an output that
  is not committed is removed.  A target that exists and is not a regular file is refused;
  an existing regular file is replaced only with ``overwrite`` (else 409 ``FileExists``,
  checked when the request arrives and again, atomically, when the file is committed).

Errors name the path as the request gave it and the reason; they never carry file content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmferry.errors import ApiError, ConfigError

MAX_PATH = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(path: str, reason: str, status: int = 400, kind: str = "BadPath") -> ApiError:
    return ApiError(status, f"path {path[:200]!r}: {reason}", kind)


@dataclass
class Output:
    """A file being written: ``file`` is the temporary file, renamed to ``name`` in the
    directory ``dir_fd`` by :meth:`commit`; :meth:`discard` (or closing uncommitted)
    removes it."""

    file: BinaryIO
    dir_fd: int
    tmp: str
    name: str
    path: Path
    done: bool = False
    #: replace a file of that name (without it, :meth:`commit` refuses an existing one)
    overwrite: bool = True
    #: the path as the request gave it (for errors)
    text: str = ""

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.overwrite:
            os.replace(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:  # link() fails if the name exists: no window for another writer
            try:
                os.link(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except FileExistsError:
                self.discard()
                raise _exists(self.text or self.name) from None
            os.unlink(self.tmp, dir_fd=self.dir_fd)
        self.done = True
        with contextlib.suppress(OSError):
            os.fsync(self.dir_fd)
        os.close(self.dir_fd)

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.dir_fd)
        os.close(self.dir_fd)


class ImagesDir:
    """The one directory a host reads and writes files in on a request's behalf."""

    def __init__(self, root: Path, state_dir: Path | None = None) -> None:
        root = Path(os.path.abspath(root))
        if state_dir is not None:
            state = Path(os.path.abspath(state_dir))
            if root == state or state.is_relative_to(root):
                raise ConfigError(
                    f"images directory {root} would hold the host's own files in {state}"
                )
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create images directory {root}: {exc.strerror}") from exc
        if root.is_symlink() or not root.is_dir():
            raise ConfigError(f"images directory {root} is not a directory")
        self.root = root
        self.real = Path(os.path.realpath(root))

    def _parts(self, text: object) -> list[str]:
        """The path's components below the root; ApiError 400 if it is no such path."""
        if not isinstance(text, str) or not text:
            raise _refuse(str(text), "a non-empty path is required")
        if "\0" in text or len(text) > MAX_PATH:
            raise _refuse(text, f"not a usable path (NUL byte or over {MAX_PATH} characters)")
        p = Path(text)
        if p.is_absolute():
            base = next((b for b in (self.root, self.real) if p.is_relative_to(b)), None)
            if base is None:
                raise _refuse(text, f"outside the images directory {self.root}", 403,
                              "OutsideImagesDir")
            p = p.relative_to(base)
        parts = list(p.parts)
        if not parts or any(part in ("..", ".") for part in parts):
            raise _refuse(text, "must name a file inside the images directory without '..'",
                          403, "OutsideImagesDir")
        return parts

    def _open_dir(self, text: str, parts: list[str]) -> int:
        """A descriptor of the directory holding the last component (no link followed)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            raise _os_refusal(text, exc) from exc
        return fd

    def where(self, text: object) -> Path:
        """Where a path would be, checked but not opened (for reports and validation)."""
        return self.root.joinpath(*self._parts(text))

    def open_read(self, text: object) -> tuple[BinaryIO, Path]:
        """Open an existing regular file for reading."""
        parts = self._parts(text)
        assert isinstance(text, str)
        dir_fd = self._open_dir(text, parts)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as exc:
            raise _os_refusal(text, exc) from exc
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _refuse(text, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), self.root.joinpath(*parts)

    def create(self, text: object, overwrite: bool = True) -> Output:
        """A temporary file beside the target, to be committed or discarded.  Without
        ``overwrite`` an existing file of that name is refused (409 ``FileExists``)."""
        parts = self._parts(text)
        assert isinstance(text, str)
        dir_fd = self._open_dir(text, parts)
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            os.close(dir_fd)
            raise _os_refusal(text, exc) from exc
        else:
            if not stat.S_ISREG(st.st_mode):
                os.close(dir_fd)
                raise _refuse(text, "exists and is not a regular file", 409, "Conflict")
            if not overwrite:
                os.close(dir_fd)
                raise _exists(text)
        tmp = f".{name[:200]}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            raise _os_refusal(text, exc) from exc
        return Output(os.fdopen(fd, "wb"), dir_fd, tmp, name, self.root.joinpath(*parts),
                      overwrite=overwrite, text=text)


def _exists(text: str) -> ApiError:
    return _refuse(text, "exists in the images directory; give --force (API: "
                         "\"force\": true) to replace it", 409, "FileExists")


def _os_refusal(text: str, exc: OSError) -> ApiError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return _refuse(text, "leads through a symbolic link or a non-directory", 403,
                       "OutsideImagesDir")
    if isinstance(exc, FileNotFoundError):
        return _refuse(text, "no such file or directory in the images directory", 404,
                       "NotFound")
    return _refuse(text, exc.strerror or type(exc).__name__)
