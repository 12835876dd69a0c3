"""Replacing files on disk so that a process killed at any instant leaves the old version or the new one.

Two tools:

- `replace_directory_files(DIR, {name: contents})` replaces a *set* of files in a directory as one step, the other
  entries of DIR kept: an adapter (config + weights) or a checkpoint (tensors + state). Each file's rename is atomic
  but a pair of renames is not, so the directory is swapped whole instead: a new DIR is built beside the old one
  (same parent, hence same file system) with the new files and hard links to everything else, and the two are
  exchanged by one `renameat2(RENAME_EXCHANGE)`.
- `replace_file(path, data)`: one file through a temporary file in the same folder, fsynced, then renamed.

Both write nothing but their own hidden entries beside the target, and both first remove what a killed earlier call
left there (`recover_directory` does that alone, without saving).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from functools import cache
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: saves into one folder are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Writer",
    "fsync",
    "recover_directory",
    "remove_stale_folders",
    "replace_directory_files",
    "replace_file",
    "usual_permissions",
]

Writer = Callable[[Path], object] | bytes
"""A file's new contents: the bytes, or a function that creates the file at the path it is given."""

# Hidden siblings `.<name>.<kind>-<16 hex digits>`: a directory being built, the old one set aside (fallback).
_SAVE, _OLD = "loraredux-save", "loraredux-old"
_SCRATCH = (
    ".loraredux-writing"  # inside a directory being built: where file-writing functions write
)
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
# What renameat2 answers where the kernel, the C library, the file system or a sandbox's syscall filter lacks it.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM})

# Tests set this to a function called with a label before every change on disk, to kill the process there.
_hook: Callable[[str], None] | None = None


def _step(what: str) -> None:
    if _hook is not None:
        _hook(what)


# ----------------------------------------------------------------------------------------------- system calls


@cache
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    fn = _libc_renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(src), None, str(dst))
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, or FileExistsError where `dst` exists (a plain rename would replace a file or an empty folder)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dst):  # checked, then renamed: another program could slip in between
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def _fsync_fd(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory; the data files were synced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries, to the disk, so that a rename never exposes unwritten data
    after a power cut (folders where the system cannot: skipped)."""
    path = Path(path)
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory to sync it
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[int | None]:
    """Hold an exclusive lock on `folder` (so that two saves into it never run at once) and yield its descriptor,
    for fsyncing renames in it. Best effort: where the folder cannot be opened or locked (some network file
    systems), the save runs unlocked and yields None."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(
            folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        )
    if fd is None:
        yield None
        return
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the process dies
        yield fd
    finally:
        os.close(fd)


def usual_permissions(folder: str | os.PathLike[str]) -> None:
    """Give `folder` and everything under it the modes that a folder and files made in place would have (0o777
    and 0o666 less the umask): for results built in a temporary folder (mkdtemp makes 0o700) by writers that
    make their files 0o600 (safetensors), so that another user, a serving process, can read them."""
    folder = Path(folder)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _write_new(path: Path, data: bytes) -> None:
    # O_CREAT's mode 0o666 is narrowed by the umask (and default ACLs), as for any file a program writes.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _stem(name: str) -> str:
    """`name` as it appears in the names of hidden entries beside it, short enough for any file system's limit."""
    raw = os.fsencode(name)
    return name if len(raw) <= 200 else hashlib.sha256(raw).hexdigest()[:32]


def _remove(path: Path) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# ----------------------------------------------------------------------------------------------- one file


def replace_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it: readers see the old file or the new one.

    The temporary file (`.<name>.<random>.tmp`) is written, fsynced and renamed over `path` (atomic on POSIX), then
    the folder is fsynced. Temporary files that a killed earlier call for the same path left behind are removed
    first (calls in one folder hold a lock on it, so no live call's file is taken for a leftover). The new file gets
    the usual permissions (0o666 less the umask).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    own = re.compile(
        rf"\.{re.escape(_stem(path.name))}\.[0-9a-f]{{16}}\.tmp"
        # what earlier versions left: tempfile.mkstemp's 8 random characters
        rf"|\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp"
    )
    with _locked(folder) as folder_fd:
        for entry in os.listdir(folder):
            if own.fullmatch(entry) and stat.S_ISREG(os.lstat(folder / entry).st_mode):
                _step(f"remove {entry}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / entry)
        tmp = folder / f".{_stem(path.name)}.{secrets.token_hex(8)}.tmp"
        _step("write")
        try:
            _write_new(tmp, data)
            _step("rename")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_fd(folder_fd)
    return path


# ----------------------------------------------------------------------------------------------- a set of files


def _target(directory: str | os.PathLike[str]) -> Path:
    """The absolute path whose entry gets swapped: a symlink's target, so that the link itself is kept."""
    target = Path(os.path.abspath(directory))
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if not target.name:
        raise ValueError(f"cannot replace the root directory {target} as a whole")
    return target


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """The hidden siblings that killed saves of `target` left, the old directories set aside first."""
    pattern = re.compile(rf"\.{re.escape(_stem(target.name))}\.({_SAVE}|{_OLD})-[0-9a-f]{{16}}")
    found = []
    for entry in sorted(os.listdir(target.parent)):
        match = pattern.fullmatch(entry)
        if match and stat.S_ISDIR(os.lstat(target.parent / entry).st_mode):
            found.append((match.group(1), target.parent / entry))
    return sorted(found, key=lambda kind_path: kind_path[0] != _OLD)


def _make_writable(folder: Path) -> None:
    """Let us delete entries in a folder kept read-only (e.g. 0o555), which we are about to remove."""
    if not os.access(folder, os.W_OK | os.X_OK):
        with contextlib.suppress(OSError):
            os.chmod(folder, stat.S_IMODE(os.lstat(folder).st_mode) | stat.S_IRWXU)


def _merge(
    leftover: Path,
    target: Path,
    managed: Collection[str],
    linked: Mapping[str, tuple[int, int]] | None = None,
    rel: str = "",
) -> list[str]:
    """Empty `leftover` into `target` and remove it; return the entries kept because both hold them differently.

    The rule, the same after a finished swap and for any leftover of a killed save: the managed files are deleted
    (uncommitted new ones, or superseded old ones); an entry `target` lacks is moved into it (a user's file that
    could not be hard-linked, or one created during the save: never lost); a folder both hold is merged the same
    way; a file both hold is deleted here, `target`'s being the same inode (a hard link) or a newer one. Each step
    is one atomic call and the rule looks only at what is on disk, so running it again after a kill at any point
    finishes the job.

    `linked` (during a save only: relative path -> (device, inode) of each hard link made) tells a file replaced in
    the old directory during the save (another program writing it), whose newer version then wins.
    """
    _make_writable(leftover)
    kept = []
    for entry in sorted(os.listdir(leftover)):
        src, dst, name = leftover / entry, target / entry, f"{rel}{entry}"
        if not rel and entry in managed:
            _step(f"delete {name}")
            _remove(src)
            continue
        st = os.lstat(src)
        try:
            dst_st = os.lstat(dst)
        except FileNotFoundError:
            _step(f"move back {name}")
            try:
                _rename_noreplace(src, dst)
            except FileExistsError:
                kept.append(name)  # created in `target` meanwhile by another program
            except OSError as err:
                if err.errno not in (errno.EBUSY, errno.EXDEV):  # a mount point cannot be moved
                    raise
                kept.append(name)
            continue
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(dst_st.st_mode):
            kept += _merge(src, dst, (), linked, f"{name}/")
        elif not stat.S_ISDIR(st.st_mode) and not stat.S_ISDIR(dst_st.st_mode):
            made = linked.get(name) if linked is not None else None
            now = (dst_st.st_dev, dst_st.st_ino)
            if made is not None and (st.st_dev, st.st_ino) != made == now:
                _step(f"replace {name}")
                os.replace(src, dst)
            else:
                _step(f"delete {name}")
                os.unlink(src)
        else:
            kept.append(name)  # a file in one, a folder in the other: the user must choose
    if not kept:
        _step(f"remove {rel or leftover.name}")
        os.rmdir(leftover)
    return kept


def _recover(target: Path, managed: Collection[str], parent_fd: int | None) -> bool:
    found = _leftovers(target)
    for kind, leftover in found:
        if not os.path.lexists(target):
            if kind == _OLD:
                # The fallback was killed between its two renames: the old directory goes back.
                _step(f"restore {leftover.name}")
                os.rename(leftover, target)
                continue
            # A first save killed before its rename (only uncommitted files), or DIR deleted since a killed
            # save: the managed files go, and whatever else is there becomes DIR again rather than being lost.
            _make_writable(leftover)
            for name in sorted(set(os.listdir(leftover)) & set(managed)):
                _step(f"delete {name}")
                _remove(leftover / name)
            if os.listdir(leftover):
                _step(f"restore {leftover.name}")
                os.rename(leftover, target)
            else:
                _step(f"remove {leftover.name}")
                os.rmdir(leftover)
            continue
        if not stat.S_ISDIR(os.stat(target).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
        kept = _merge(leftover, target, managed)
        if kept:
            warnings.warn(
                f"kept {leftover}: {target} also holds {kept}, but differently; nothing was deleted, "
                "merge them by hand",
                stacklevel=3,
            )
    if found:
        _fsync_fd(parent_fd)
    return bool(found)


def recover_directory(directory: str | os.PathLike[str], names: Collection[str]) -> bool:
    """Clean up after a `replace_directory_files(directory, ...)` that was killed, without saving anything.

    Each save does this first; call it where a folder is read and a save may have been killed just before (e.g.
    before resuming from a checkpoint), or to reclaim the space of a killed save's leftovers.

    Args:
        directory: the directory the killed save wrote.
        names: the names of the files that save replaces (their copies in a leftover are deleted).

    Returns:
        Whether there was anything to clean up.
    """
    target = _target(directory)
    if not target.parent.is_dir():
        return False
    with _locked(target.parent) as parent_fd:
        return _recover(target, frozenset(names) | {_SCRATCH}, parent_fd)


def _new_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{_stem(target.name)}.{kind}-{secrets.token_hex(8)}"


def _copy_folder_metadata(st: os.stat_result, src: Path, dst: Path) -> None:
    """Owner and group where allowed, then mode, times and extended attributes (ACLs too) of `src` to `dst`."""
    if (st.st_uid, st.st_gid) != (os.lstat(dst).st_uid, os.lstat(dst).st_gid):
        with contextlib.suppress(OSError):
            os.chown(dst, st.st_uid, st.st_gid)
        # Not root: the group at least, through which a serving process may read.
        with contextlib.suppress(OSError):
            os.chown(dst, -1, st.st_gid)
    shutil.copystat(src, dst, follow_symlinks=False)


def _carry(
    src: Path, dst: Path, device: int, linked: dict[str, tuple[int, int]], name: str
) -> bool:
    """Rebuild the entry `src` at `dst` out of hard links (folders made anew); False where that is impossible."""
    try:
        st = os.lstat(src)
    except FileNotFoundError:  # deleted meanwhile
        return True
    if stat.S_ISDIR(st.st_mode):
        if st.st_dev != device:
            raise OSError(errno.EBUSY, f"{src} is a mount point, which a save cannot carry over")
        _step(f"mkdir {name}")
        os.mkdir(dst)
        for entry in sorted(os.listdir(src)):
            if not _carry(src / entry, dst / entry, device, linked, f"{name}/{entry}"):
                return False
        _copy_folder_metadata(st, src, dst)
        return True
    _step(f"link {name}")
    try:
        # A symlink is linked itself, not what it points to.
        os.link(src, dst, follow_symlinks=False)
    except FileNotFoundError:
        return True
    # protected_hardlinks (another user's file), too many links, no hard links (or no linkat) here
    except (OSError, NotImplementedError):
        return False
    made = os.lstat(dst)
    linked[name] = (made.st_dev, made.st_ino)
    return True


def _swap(staging: Path, target: Path) -> Path:
    """Put `staging` at `target`; return where the old directory now is."""
    _step("exchange")
    try:
        _renameat2(staging, target, _RENAME_EXCHANGE)
        return staging
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise OSError(
                err.errno,
                f"cannot replace {target} as a whole (a mount point?): save into a folder inside it",
            ) from err
        if err.errno not in _UNSUPPORTED:
            raise
    # Fallback: two renames, between which `target` does not exist (see `replace_directory_files`).
    old = _new_sibling(target, _OLD)
    _step("set old aside")
    os.rename(target, old)
    try:
        _step("rename new in")
        os.rename(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, target)
        raise
    return old


def _write_all(staging: Path, files: Mapping[str, Writer]) -> None:
    """Write and fsync the new files in `staging`. A function writes in a scratch folder, as it may leave
    temporary files of its own (safetensors does) that a leftover must not pass off as the user's."""
    scratch = staging / _SCRATCH
    for name, contents in files.items():
        _step(f"write {name}")
        if isinstance(contents, (bytes, bytearray, memoryview)):
            _write_new(staging / name, bytes(contents))
            continue
        if not scratch.exists():
            os.mkdir(scratch)
        # Created first to learn the usual mode (0o666 less the umask, as the kernel applies it).
        os.close(os.open(scratch / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        usual = stat.S_IMODE(os.stat(scratch / name).st_mode)
        contents(scratch / name)
        if stat.S_IMODE(os.stat(scratch / name).st_mode) != usual:  # e.g. a temporary file's 0o600
            os.chmod(scratch / name, usual)
        fsync(scratch / name)
        _step(f"place {name}")
        os.rename(scratch / name, staging / name)
    if scratch.exists():
        _step("remove scratch")
        shutil.rmtree(scratch)  # what a writer left besides its file


def _cwd_inside(target: Path) -> str | None:
    """Where this process's working directory is inside `target` (relative), if it is."""
    try:
        cwd, real = os.getcwd(), os.path.realpath(target)
    except OSError:
        return None
    if cwd == real:
        return "."
    return os.path.relpath(cwd, real) if cwd.startswith(real + os.sep) else None


def replace_directory_files(directory: str | os.PathLike[str], files: Mapping[str, Writer]) -> Path:
    """Write `files` into `directory` (created if needed) so that, wherever the process is killed, `directory`
    holds all the old files or all the new ones, beside everything else it held.

    How: a new directory is built as a hidden sibling, `.<name>.loraredux-save-<random>` (same parent, so same file
    system; nothing is ever made inside `directory`), with the new files (written and fsynced) and a hard link to
    every other file in `directory`, its subfolders rebuilt the same way (same mode, owner where allowed, times and
    extended attributes). Then one `renameat2(RENAME_EXCHANGE)` swaps the two directories, atomically, and the old
    one, now at the sibling's path, is emptied: its copies of the new files' names are deleted, its hard-linked
    twins unlinked, and anything `directory` lacks (an entry that could not be hard-linked, or one another program
    created during the save) is moved in. Each save first does the same emptying for any sibling a killed save left
    (`recover_directory`), so leftovers never pile up and nothing they hold is lost.

    Guarantee (Linux >= 3.15 with glibc >= 2.28, on file systems with `RENAME_EXCHANGE`: ext4, XFS, Btrfs, tmpfs,
    ...): at every instant `directory` holds the complete old set of `files` or the complete new one, never a mix,
    and every other entry it held, with the same contents (hard links are the same files). Files are fsynced before
    the swap and the parent after it, so a power cut also leaves one set or the other. Saves into one parent folder
    are serialised by a lock on it. A new `directory` gets the usual mode (0o777 less the umask); a replaced one
    keeps its mode (and owner, where allowed); new files get 0o666 less the umask, whatever mode a writer gave them.

    Limits:
        - A reader that opens one file before the swap and the other after it still pairs old with new: nothing
          done through paths prevents that. Readers that must never mix should open the directory once and read
          both files relative to it (`os.open(..., dir_fd=)`), as that descriptor keeps naming one directory;
          loraredux's own reader (`files.read_adapter`) does, and reads again when a save emptied it meanwhile.
        - `directory` becomes a new directory (inode), as do its subfolders: programs holding it open, or with
          their working directory in it, keep seeing the old one (this process's working directory is moved to the
          new one). Files keep their inodes, so open files stay valid.
        - Entries that cannot be hard-linked (another user's file under `fs.protected_hardlinks`, a file at the
          link limit) are moved from the old directory just after the swap: a kill in between leaves them in the
          hidden sibling until the next save or `recover_directory`. The work grows with the number of entries
          under `directory` (one link and one unlink each).
        - Where `RENAME_EXCHANGE` is unsupported (not Linux, glibc < 2.28, some network or FUSE file systems), the
          old directory is renamed aside (`.<name>.loraredux-old-<random>`) and the new one renamed in. Never a
          mix, but between those two renames `directory` does not exist: a reader then gets "no such directory",
          and a kill there leaves it absent until the next save or `recover_directory`, which put the old one back.
        - An entry deleted from `directory` after a killed save, before the next one, can reappear, as a leftover's
          copy is only discarded where `directory` holds the same name.
        - `directory` itself cannot be a mount point, nor hold one; the parent must be writable. The name
          `.loraredux-writing` inside `directory` is reserved (a scratch folder while the files are written).

    Args:
        directory: the directory to write (a symlink to one: its target, the link kept).
        files: file name -> contents, as bytes, or a function that creates the file at the path it is given
            (inside the hidden sibling; it must not write elsewhere in the parent, whose lock is held).

    Returns:
        `directory` as a `Path`.

    Raises:
        NotADirectoryError: `directory` exists and is not a directory.
        OSError: from the file system; until the swap nothing changed, and the sibling is removed.
    """
    if not files:
        raise ValueError("no files to write")
    for name in files:
        if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name):
            raise ValueError(f"{name!r} is not a file name")
    managed = frozenset(files) | {_SCRATCH}
    target = _target(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent) as parent_fd:
        _recover(target, managed, parent_fd)
        try:
            before = os.lstat(target)
        except FileNotFoundError:
            before = None
        if before is not None and not stat.S_ISDIR(before.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
        staging = _new_sibling(target, _SAVE)
        _step("mkdir staging")
        os.mkdir(staging)
        swapped = False
        try:
            _write_all(staging, files)
            if before is None:
                fsync(staging)
                _step("rename")
                os.rename(staging, target)
                swapped = True
                _fsync_fd(parent_fd)
                return Path(directory)
            linked: dict[str, tuple[int, int]] = {}
            for entry in sorted(set(os.listdir(target)) - managed):
                inner: dict[str, tuple[int, int]] = {}
                if _carry(target / entry, staging / entry, before.st_dev, inner, entry):
                    linked |= inner
                elif os.path.lexists(staging / entry):
                    # Moved by `_merge` after the swap instead; what was made here is hard links only.
                    _step(f"unlink partial {entry}")
                    _remove(staging / entry)
            _copy_folder_metadata(before, target, staging)
            os.utime(staging)  # its contents changed: tools comparing times must see that
            fsync(staging)
            cwd = _cwd_inside(target)
            old = _swap(staging, target)
            swapped = True
            _fsync_fd(parent_fd)
            kept = _merge(old, target, managed, linked)
            if cwd is not None:
                with contextlib.suppress(OSError):
                    os.chdir(target / cwd)
            fsync(target)
            _fsync_fd(parent_fd)
            if kept:
                warnings.warn(
                    f"kept {old}: {target} also holds {kept}, but differently; nothing was deleted, merge "
                    "them by hand",
                    stacklevel=2,
                )
        except BaseException:
            if not swapped:
                shutil.rmtree(staging, ignore_errors=True)  # new files and hard links only
            raise
    return Path(directory)


def remove_stale_folders(
    directory: str | os.PathLike[str], pattern: str, names: Collection[str]
) -> list[Path]:
    """Remove the subfolders of `directory` whose names match `pattern` (whole name, a regular expression) and that
    hold nothing but files named in `names`: temporary folders that earlier versions left inside a directory.

    A folder holding anything else is kept: it may be somebody's data.

    Returns:
        The folders removed.
    """
    directory = Path(directory)
    try:
        entries = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    regex = re.compile(pattern)
    for entry in entries:
        path = directory / entry
        if not regex.fullmatch(entry) or not stat.S_ISDIR(os.lstat(path).st_mode):
            continue
        inside = os.listdir(path)
        if all(n in names and stat.S_ISREG(os.lstat(path / n).st_mode) for n in inside):
            _step(f"remove {entry}")
            shutil.rmtree(path)
            removed.append(path)
    return removed
