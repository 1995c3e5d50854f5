"""Code archives: pack a project folder into a deterministic tar, check one, unpack one safely.

Three users: the CLI packs (`trainctl submit --code DIR`), the server checks every code
upload before storing it (`check_archive` -> INVALID_ARGUMENT naming the member), and
the worker unpacks into a fresh directory of its own (`safe_unpack`).

Determinism: the same tree gives the same bytes, so the same sha256, so an unchanged
tree is stored and sent once. Members are sorted, and mtime/uid/gid/owner names are
fixed; of the mode only "executable or not" survives.

Safety: an archive is accepted only if every member is a directory, a regular file or a
symlink whose target stays inside the tree, with a relative, normalized name and no
member below a symlink (so a target can be judged by its text alone: see `_link_fault`).
The archive is plain (uncompressed) tar without sparse members, so what it unpacks to
is never bigger than itself.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

IGNORE_FILES = (".gitignore", ".trainctlignore")   # per directory; the deeper file wins, .trainctlignore last
ALWAYS_SKIPPED = ".git"
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
_FILE_MODE, _EXEC_MODE, _DIR_MODE, _LINK_MODE = 0o644, 0o755, 0o755, 0o777


class ArchiveError(ValueError):
    """An archive (or a tree being packed) has a member that must not be unpacked."""

    def __init__(self, member: str, reason: str):
        self.member, self.reason = member, reason
        super().__init__(f"member {member!r}: {reason}" if member else reason)


class TooBig(ValueError):
    """The tree to pack is over the size cap; the message names its biggest files."""

    def __init__(self, total: int, max_bytes: int, biggest: list[tuple[str, int]]):
        self.total, self.max_bytes, self.biggest = total, max_bytes, biggest
        lines = "\n".join(f"  {human(size):>10}  {name}" for name, size in biggest)
        super().__init__(f"the code folder is {human(total)}, over the {human(max_bytes)} cap "
                         f"(--max-code-mb raises it; .trainctlignore or .gitignore leave files out). "
                         f"Biggest files:\n{lines}")


@dataclass(frozen=True)
class PackResult:
    files: int      # regular files and symlinks packed
    bytes: int      # size of the archive written
    sha256: str = ""  # of the archive, hashed as it was written (no second read)


class _Hashing:
    """A write-only file that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.n


@dataclass(frozen=True)
class ArchiveInfo:
    members: int
    bytes: int      # sum of the regular files' sizes


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # the loop returns at GB


# ---------------------------------------------------------------------------- walking a tree
def _spec(f: Path):
    import pathspec   # client/worker dependency; check_archive (server) does not need it

    return pathspec.GitIgnoreSpec.from_lines(f.read_text(encoding="utf-8", errors="replace").splitlines())


class _Ignores:
    """The ignore files seen on the way down: (base, prefix, spec) where a path relative to
    the packed root matches as `prefix + path-below-base` (prefix: for a .gitignore above
    the root, the root's path relative to that file's folder)."""

    def __init__(self, specs: tuple = ()):
        self.specs = specs

    @classmethod
    def above(cls, root: Path) -> "_Ignores":
        """The .gitignore files from the enclosing git work tree's top down to the root's
        parent, which git would apply to the root's files too. None outside a work tree."""
        real = Path(os.path.realpath(root))
        chain = [real, *real.parents]
        top = next((i for i, d in enumerate(chain) if (d / ALWAYS_SKIPPED).exists()), None)
        specs = []
        for d in reversed(chain[1:top + 1] if top else []):
            f = d / ".gitignore"
            if f.is_file():
                specs.append(("", real.relative_to(d).as_posix() + "/", _spec(f)))
        # A folder git ignores (`build/`) that the user names with --code is packed: then
        # the files above do not speak for it at all.
        for _, prefix, spec in specs:
            parts = prefix.rstrip("/").split("/")
            if any(spec.check_file("/".join(parts[:k]) + "/").include for k in range(1, len(parts) + 1)):
                return cls()
        return cls(tuple(specs))

    def enter(self, root: Path, rel: str) -> "_Ignores":
        new = []
        for fname in IGNORE_FILES:
            f = root / rel / fname
            if f.is_file() and not f.is_symlink():
                new.append((rel, "", _spec(f)))
        return _Ignores(self.specs + tuple(new)) if new else self

    def ignored(self, rel: str, is_dir: bool) -> bool:
        # Git's rule: the deepest file (and the last pattern in it) that says anything decides.
        for base, prefix, spec in reversed(self.specs):
            sub = prefix + (rel[len(base) + 1:] if base else rel)
            result = spec.check_file(sub + "/" if is_dir else sub)
            if result.include is not None:
                return result.include
        return False


def _walk(root: Path, rel: str, ignores: _Ignores) -> Iterator[tuple[str, os.stat_result]]:
    """(relative posix path, lstat) of every kept entry, sorted, directories before their
    contents. Symlinks are never followed."""
    ignores = ignores.enter(root, rel)
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda d: d.name)
    for d in entries:
        if d.name == ALWAYS_SKIPPED:
            continue
        path = f"{rel}/{d.name}" if rel else d.name
        st = d.stat(follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        if ignores.ignored(path, is_dir):
            continue
        yield path, st
        if is_dir:
            yield from _walk(root, path, ignores)


def _pack_link(root_real: str, root: Path, rel: str) -> str:
    """The link text to store for the symlink at `rel`: a relative path to where it
    points, when that is inside the tree; otherwise the tree is refused."""
    text = os.readlink(root / rel)
    parent = posixpath.dirname(rel)
    where = os.path.join(root_real, parent, text)          # absolute `text` wins in join
    real = os.path.realpath(where)
    if os.path.exists(where):
        target = real                                         # follows chains of links
    else:
        target = os.path.normpath(where)                     # dangling: judged by its text
    if not (target == root_real or target.startswith(root_real + os.sep)):
        raise ArchiveError(rel, f"symlink to {text!r} points outside the code folder "
                                f"(copy the file in, or list the link in .trainctlignore)")
    out = os.path.relpath(target, os.path.join(root_real, parent)).replace(os.sep, "/")
    fault = _link_fault(rel, out)
    if fault:   # e.g. a target reached through a symlinked directory
        raise ArchiveError(rel, fault)
    return out


def scan(root: str | os.PathLike) -> list[tuple[str, os.stat_result]]:
    """What `pack` would put in the archive, without packing."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"code folder {str(root)!r} is not a directory")
    return list(_walk(root, "", _Ignores.above(root)))


def tree_key(entries: list[tuple[str, os.stat_result]]) -> str:
    """A digest of what `scan` found: names, types, sizes and modification times. Equal
    keys mean the same archive (as git's index assumes), so a client may skip re-packing
    a tree it packed before and only ask the server about the archive's sha256."""
    h = hashlib.sha256()
    for rel, st in entries:
        h.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def pack(root: str | os.PathLike, out_path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
         entries: Optional[list[tuple[str, os.stat_result]]] = None) -> PackResult:
    """Write `root` (ignore files honoured, .git/ skipped) as a deterministic tar at
    `out_path` (`entries`: a `scan` of it made just before). Raises TooBig over `max_bytes`
    of file content, ArchiveError for a link out of the tree or a special file (fifo,
    socket, device)."""
    root = Path(root)
    entries = scan(root) if entries is None else entries
    root_real = os.path.realpath(root)
    total = sum(st.st_size for _, st in entries if stat.S_ISREG(st.st_mode))
    if total > max_bytes:
        biggest = heapq.nlargest(5, ((p, st.st_size) for p, st in entries if stat.S_ISREG(st.st_mode)),
                                 key=lambda t: t[1])
        raise TooBig(total, max_bytes, biggest)
    try:
        with open(out_path, "wb") as raw:
            f = _Hashing(raw)
            _write_tar(f, root, root_real, entries)
    except BaseException:
        Path(out_path).unlink(missing_ok=True)   # never a half archive that looks whole
        raise
    return PackResult(files=sum(1 for _, st in entries if not stat.S_ISDIR(st.st_mode)), bytes=f.n,
                      sha256=f.h.hexdigest())


def _write_tar(f, root: Path, root_real: str, entries) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, st in entries:
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, _DIR_MODE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.mode = tarfile.SYMTYPE, _LINK_MODE
                info.linkname = _pack_link(root_real, root, rel)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.mode = _EXEC_MODE if st.st_mode & 0o111 else _FILE_MODE
                info.size = st.st_size
                with open(root / rel, "rb") as src:
                    tar.addfile(info, src)
            else:
                raise ArchiveError(rel, "is not a regular file, directory or symlink (a fifo, socket or "
                                        "device); list it in .trainctlignore")


# ---------------------------------------------------------------------------- checking
def _name_fault(name: str) -> Optional[str]:
    if not name or "\x00" in name:
        return "empty or NUL in the name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
        return "absolute path"
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        return "'..' in the path"
    if any(p in ("", ".") for p in parts):
        return "not a normalized path (empty or '.' component)"
    return None


def _link_fault(name: str, target: str) -> Optional[str]:
    """A link's target is safe by its text alone when no member lies below a symlink
    (checked separately): the leading '..'s climb real directories and must not climb
    above the root, and past them the path only descends (through links that are
    themselves safe)."""
    if not target or target.startswith("/") or "\x00" in target:
        return f"symlink to {target!r}: the target must be a relative path"
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return f"symlink to {target!r}: '..' after a name"
    if ups > name.rstrip("/").count("/"):
        return f"symlink to {target!r} points outside the tree"
    return None


def check_archive(path: str | os.PathLike) -> ArchiveInfo:
    """Accept a code archive or raise ArchiveError naming the first bad member: an
    absolute path, '..', a duplicate, a link out of the tree or below a symlink, a hard
    link, a device, fifo or sparse member, or a file that is not a plain tar."""
    links: set[str] = set()
    names: list[str] = []
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                name = m.name
                fault = _name_fault(name)
                if fault is None:
                    if m.issym():
                        fault = _link_fault(name, m.linkname)
                        links.add(name.rstrip("/"))
                    elif m.islnk():
                        fault = "hard links are not accepted"
                    elif m.issparse():
                        fault = "sparse files are not accepted"
                    elif m.isreg():
                        total += m.size
                    elif not m.isdir():
                        kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                                tarfile.FIFOTYPE: "fifo"}.get(m.type, f"tar type {m.type!r}")
                        fault = f"{kind} members are not accepted"
                key = name.rstrip("/")
                if fault is None and key in seen:
                    fault = "appears twice"
                if fault:
                    raise ArchiveError(name, fault)
                seen.add(key)
                names.append(key)
    except tarfile.TarError as exc:
        raise ArchiveError("", f"not a valid (uncompressed) tar archive: {exc}") from None
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise ArchiveError(name, f"lies below the symlink {'/'.join(parts[:i])!r}")
    return ArchiveInfo(members=len(names), bytes=total)


# ---------------------------------------------------------------------------- unpacking
def safe_unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> ArchiveInfo:
    """Unpack a checked archive into `dest` (created; must be empty if it exists). Never
    writes outside `dest`: check_archive first, then tarfile's "data" filter as a second
    guard (it re-checks every path and link against the real filesystem)."""
    info = check_archive(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"unpack destination {str(dest)!r} is not empty")
    with tarfile.open(archive, mode="r:") as tar:
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            member = getattr(getattr(exc, "tarinfo", None), "name", "")
            raise ArchiveError(member, str(exc)) from None
    return info
