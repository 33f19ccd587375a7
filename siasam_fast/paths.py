"""Small path checks shared by the commands that write folders, and the errors those commands
report as one line (no heavy imports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# What a command reports as a one-line usage error (exit status 2): bad values and paths.
USAGE_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

# The repository's configs/ (run configs, configs/ds/ DeepSpeed configs): a wheel installs it as
# siasam_fast/configs/ (setup.py); an editable install reads it from the checkout.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
CHECKOUT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def packaged_config(name: str | os.PathLike) -> Path:
    """The file ``name`` (e.g. "demo.yaml", "ds/zero2_fp32.json") of the configs shipped with the
    package: the installed copy, else the checkout's (that path, missing, if neither has it)."""
    for folder in (PACKAGE_CONFIGS, CHECKOUT_CONFIGS):
        if (folder / name).is_file():
            return folder / name
    return CHECKOUT_CONFIGS / name


def shipped_config(path: str | os.PathLike) -> Path:
    """A ``--config`` / ``--deepspeed_config`` path: itself if it exists; a relative
    ``configs/...`` path that does not exist here names the config shipped with the package, so
    the README's commands (``--config configs/synthetic.yaml``) run from any folder and from an
    installed wheel. A file of that name in the working folder comes first."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",) or \
            len(path.parts) < 2:
        return path
    found = packaged_config(Path(*path.parts[1:]))
    return found if found.is_file() else path


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file (``folder`` itself or one of its parents) that stops ``folder`` being a folder,
    or None."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def check_output_file(path: str | os.PathLike, option: str, writable: bool = False) -> Path:
    """``path`` as a Path, or a ValueError naming ``option`` when no file can be written there:
    it is empty or a folder, or a file stands where one of its folders should be; ``writable``:
    also when the file (if it exists) cannot be opened for writing, or the nearest existing folder
    on its way takes no new file (tried with a probe file, removed at once: permissions alone
    pass /proc, /sys and read-only mounts for root). The file itself is neither created nor
    changed."""
    if not str(path):
        raise ValueError(f"{option} is empty; give a file path")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file path")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise ValueError(f"{option} {str(path)!r}: {str(blocker)!r} is a file, not a folder; "
                         "give a file path")
    if writable:
        target = path if path.exists() else next(p for p in path.absolute().parents
                                                  if p.exists())
        why = _not_writable(target)
        if why:
            raise ValueError(f"{option} {str(path)!r}: {str(target)!r} is not writable here "
                             f"({why})")
    return path


def _not_writable(target: Path) -> str:
    """Why nothing can be written at ``target`` (an existing file: opened for appending, nothing
    written; a folder: a probe file created and removed), or ""."""
    if not os.access(target, os.W_OK):
        return "no write permission"
    folder = target.is_dir()
    try:
        if folder:
            with tempfile.NamedTemporaryFile(dir=target, prefix=".siasam-probe-"):
                pass
        else:
            with open(target, "ab"):
                pass
    except OSError as err:  # /proc says "No such file or directory": say what was tried
        what = "creating a file in it" if folder else "opening it for writing"
        return f"{what} fails: {err.strerror or type(err).__name__}"
    return ""


def takes_new_files(folder: str | os.PathLike) -> bool:
    """Whether a new file can be made in ``folder`` (not made yet: its nearest existing parent),
    tried with a probe file as :func:`check_output_file` does."""
    folder = Path(folder).absolute()
    target = next(p for p in (folder, *folder.parents) if p.exists())
    return target.is_dir() and not _not_writable(target)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed over it: a write cut
    short (a kill, a full disk) leaves the previous version, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
