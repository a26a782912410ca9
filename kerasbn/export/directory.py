"""Writing a directory all at once: into a temporary sibling, then renamed.

A reader (TF Serving polls `base/` for new version directories) never sees a
half-written `base/<version>/`, and a failed export leaves nothing behind: not
the temporary directory, and not the parent directories it had to create.
"""

import contextlib
import errno
import os
import shutil
import tempfile


class ExportDirExistsError(FileExistsError, ValueError):
    """`export_dir` exists and is not empty, and `overwrite` is False.

    A `FileExistsError` and a `ValueError`, so either `except` catches it.
    """


def check_export_dir(export_dir):
    """`export_dir` as an absolute path string.

    Raises:
      TypeError: not a str or `os.PathLike`.
      ValueError: the empty string.
    """
    if isinstance(export_dir, bytes) or not isinstance(export_dir, (str, os.PathLike)):
        raise TypeError(
            "export_dir must be a str or os.PathLike path; received "
            f"export_dir={export_dir!r} of type {type(export_dir).__name__}."
        )
    path = os.fspath(export_dir)
    if not path:
        raise ValueError("export_dir must not be empty.")
    return os.path.abspath(path)


def check_target(path, overwrite):
    """Refuses a target that is a file, or a non-empty directory unless `overwrite`."""
    if os.path.isdir(path):
        if os.listdir(path) and not overwrite:
            raise ExportDirExistsError(
                f"export_dir {path!r} already exists and is not empty. Pass "
                "overwrite=True to replace it, or choose a new version directory."
            )
    elif os.path.lexists(path):
        raise ExportDirExistsError(f"export_dir {path!r} exists and is not a directory.")


def _os_error(error, message):
    """The same kind of `OSError` (e.g. `PermissionError`), with our message."""
    return type(error)(error.errno, f"{message}: {error.strerror or error}")


def missing_ancestors(path):
    """The ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.lexists(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    return missing


def _remove_empty(directories):
    for directory in directories:  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            return


def _make_parent(path):
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise _os_error(
            error, f"export_dir {path!r}: cannot create its parent directory {parent!r}"
        ) from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"export_dir {path!r}: its parent {parent!r} is not writable"
        )
    return parent


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
    """Yields a temporary directory that becomes `path` when the block succeeds.

    The temporary directory is created next to `path` (same file system, so the
    final step is a rename), named `.<name>.tmp-*` so that TF Serving, which
    only loads numeric version directories, ignores it. On any exception it is
    removed, so are the parent directories created for it, and `path` is left
    as it was. With `overwrite`, an existing `path` is moved aside and deleted
    only after the new directory is in place.

    Args:
      path: absolute path of the directory to create.
      overwrite: bool, default False. Replace a non-empty directory at `path`.

    Raises:
      ExportDirExistsError: `path` is a file, or a non-empty directory and
        `overwrite` is False.
      PermissionError: the parent of `path` cannot be created or written (or
        another `OSError`, e.g. `NotADirectoryError` when a file is in the
        way), with a message naming `export_dir`.
    """
    check_target(path, overwrite)
    created = missing_ancestors(path)
    try:
        parent = _make_parent(path)
        name = os.path.basename(path)
        try:
            staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        except OSError as error:
            raise _os_error(error, f"export_dir {path!r}: cannot write in {parent!r}") from error
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield staging
        check_target(path, overwrite)  # it may have appeared meanwhile
        _replace(staging, path, parent, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _replace(staging, path, parent, name):
    os.chmod(staging, 0o755)  # mkdtemp makes it private to its owner
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
