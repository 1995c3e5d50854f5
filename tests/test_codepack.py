"""Code archives (trainctl/codepack.py): deterministic packing, ignore files, links, the
size cap, and the checks that keep a hostile archive from writing outside its folder.
In-process and fast; the CLI/server side is in test_submit_code.py."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from trainctl import codepack
from trainctl.codepack import ArchiveError, TooBig, check_archive, pack, safe_unpack


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _names(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def _tree(root: Path, files: dict[str, str], order=None) -> Path:
    for rel in order or files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(files[rel])
    return root


FILES = {"train.py": "print('hi')\n", "lib/model.py": "x = 1\n", "lib/data/load.py": "y = 2\n", "README": "r\n"}


# ---------------------------------------------------------------------------- determinism
def test_same_tree_gives_same_sha256_whatever_mtimes_order_and_owner_bits(tmp_path):
    a = _tree(tmp_path / "a", FILES)
    b = _tree(tmp_path / "b", FILES, order=list(reversed(FILES)))   # created in another order
    os.chmod(b / "README", 0o600)                                  # mode bits other than +x do not count
    pack(a, tmp_path / "1.tar")
    time.sleep(0.01)
    for p in (a / "train.py", a / "lib" / "model.py", a / "lib"):
        os.utime(p, (12345, 12345))                                # touched: mtimes change
    pack(a, tmp_path / "2.tar")
    pack(b, tmp_path / "3.tar")
    assert _sha(tmp_path / "1.tar") == _sha(tmp_path / "2.tar") == _sha(tmp_path / "3.tar")
    assert pack(a, tmp_path / "4.tar").sha256 == _sha(tmp_path / "1.tar")   # hashed while written
    with tarfile.open(tmp_path / "1.tar") as t:
        members = t.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)  # sorted walk
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_content_and_exec_bit_change_the_sha256(tmp_path):
    a = _tree(tmp_path / "a", FILES)
    pack(a, tmp_path / "1.tar")
    os.chmod(a / "train.py", 0o755)
    pack(a, tmp_path / "2.tar")
    (a / "README").write_text("changed\n")
    pack(a, tmp_path / "3.tar")
    assert len({_sha(tmp_path / f"{i}.tar") for i in (1, 2, 3)}) == 3
    with tarfile.open(tmp_path / "2.tar") as t:
        assert t.getmember("train.py").mode == 0o755 and t.getmember("README").mode == 0o644


def test_round_trip_unpacks_the_same_files_modes_and_links(tmp_path):
    src = _tree(tmp_path / "src", FILES)
    os.chmod(src / "train.py", 0o755)
    os.symlink("lib/model.py", src / "model_link.py")
    (src / "empty").mkdir()
    pack(src, tmp_path / "c.tar")
    dest = tmp_path / "out" / "src"
    info = safe_unpack(tmp_path / "c.tar", dest)
    for rel, text in FILES.items():
        assert (dest / rel).read_text() == text
    assert os.access(dest / "train.py", os.X_OK) and not os.access(dest / "README", os.X_OK)
    assert os.readlink(dest / "model_link.py") == "lib/model.py" and (dest / "model_link.py").read_text() == "x = 1\n"
    assert (dest / "empty").is_dir()
    assert info.bytes == sum(len(t) for t in FILES.values())


# ---------------------------------------------------------------------------- ignore files
def test_gitignore_nested_trainctlignore_and_dot_git(tmp_path):
    root = _tree(tmp_path / "p", {
        **FILES,
        ".gitignore": "*.pyc\nbuild/\n/data\n!keep.pyc\n",
        "x.pyc": "", "keep.pyc": "", "build/out.bin": "b", "data/big.npy": "d", "lib/data/ok.py": "",
        "lib/.gitignore": "secret.txt\n!x.pyc\n",      # nested: relative to lib/, and overrides the root's *.pyc
        "lib/secret.txt": "s", "lib/x.pyc": "", "secret.txt": "top-level: not ignored",
        ".trainctlignore": "*.ckpt\nREADME\n",
        "w.ckpt": "c", "lib/w.ckpt": "c",
        ".git/HEAD": "ref", ".git/objects/ab": "o", "lib/.git": "gitdir: ../.git/modules/lib",
    })
    pack(root, tmp_path / "c.tar")
    names = set(_names(tmp_path / "c.tar"))
    assert {"train.py", "lib/model.py", "lib/data/load.py", "lib/data/ok.py", "keep.pyc", "secret.txt",
            "lib/x.pyc", ".gitignore", "lib/.gitignore", ".trainctlignore"} <= names
    for gone in ("x.pyc", "build", "build/out.bin", "data", "data/big.npy", "lib/secret.txt", "w.ckpt",
                 "lib/w.ckpt", "README", ".git", ".git/HEAD", "lib/.git"):
        assert gone not in names, gone
    assert "lib/data" in names   # `/data` is anchored to the root: lib/data stays


def test_trainctlignore_can_take_back_a_gitignored_file_and_git_stays_out(tmp_path):
    root = _tree(tmp_path / "p", {"a.py": "", "weights.bin": "w", ".gitignore": "*.bin\n",
                                  ".trainctlignore": "!weights.bin\n!.git\n", ".git/config": "c"})
    pack(root, tmp_path / "c.tar")
    names = _names(tmp_path / "c.tar")
    assert "weights.bin" in names and not any(n.startswith(".git/") or n == ".git" for n in names)


def test_a_subfolder_of_a_git_work_tree_gets_the_gitignores_above_it(tmp_path):
    repo = _tree(tmp_path / "repo", {".git/HEAD": "ref", ".gitignore": "__pycache__/\n*.log\nbuild/\n",
                                     "examples/.gitignore": "local.txt\n", "examples/attach/a.py": "",
                                     "examples/attach/__pycache__/a.pyc": "", "examples/attach/run.log": "",
                                     "examples/attach/local.txt": "", "build/out/b.py": ""})
    pack(repo / "examples" / "attach", tmp_path / "c.tar")
    assert _names(tmp_path / "c.tar") == ["a.py"]
    outside = _tree(tmp_path / "plain", {"__pycache__/a.pyc": "", "run.log": ""})   # no work tree: no rules
    pack(outside, tmp_path / "d.tar")
    assert _names(tmp_path / "d.tar") == ["__pycache__", "__pycache__/a.pyc", "run.log"]
    pack(repo / "build" / "out", tmp_path / "e.tar")   # a folder git ignores, named on purpose: packed
    assert _names(tmp_path / "e.tar") == ["b.py"]


# ---------------------------------------------------------------------------- links and special files
def test_links_inside_are_kept_relative_links_out_are_refused_by_name(tmp_path):
    root = _tree(tmp_path / "p", FILES)
    os.symlink(root / "lib" / "model.py", root / "abs_inside.py")    # absolute but inside: made relative
    os.symlink("data", root / "lib" / "data_link")                   # a directory: kept as a link, not followed
    os.symlink("missing.py", root / "dangling.py")                    # dangling inside: kept
    pack(root, tmp_path / "c.tar")
    with tarfile.open(tmp_path / "c.tar") as t:
        links = {m.name: m.linkname for m in t if m.issym()}
        names = t.getnames()
    assert links == {"abs_inside.py": "lib/model.py", "lib/data_link": "data", "dangling.py": "missing.py"}
    assert not any(n.startswith("lib/data_link/") for n in names)

    outside = tmp_path / "secret.txt"
    outside.write_text("s")
    os.symlink("../../secret.txt", root / "lib" / "leak")
    with pytest.raises(ArchiveError) as ei:
        pack(root, tmp_path / "d.tar")
    assert ei.value.member == "lib/leak" and "outside the code folder" in str(ei.value)
    assert not (tmp_path / "d.tar").exists()   # no half archive left behind
    os.unlink(root / "lib" / "leak")
    os.symlink(str(outside), root / "abs_out")
    with pytest.raises(ArchiveError, match="'abs_out'"):
        pack(root, tmp_path / "d.tar")
    os.unlink(root / "abs_out")
    os.symlink(str(tmp_path), root / "chain_dir")       # a link to a directory out of the tree
    os.symlink("chain_dir/secret.txt", root / "chain")  # through another link: judged by where it lands
    with pytest.raises(ArchiveError) as ei:
        pack(root, tmp_path / "d.tar")
    assert ei.value.member in ("chain", "chain_dir")


def test_a_fifo_is_refused_by_name_unless_ignored(tmp_path):
    root = _tree(tmp_path / "p", FILES)
    os.mkfifo(root / "lib" / "pipe")
    with pytest.raises(ArchiveError) as ei:
        pack(root, tmp_path / "c.tar")
    assert ei.value.member == "lib/pipe" and "fifo" in str(ei.value)
    (root / ".trainctlignore").write_text("pipe\n")
    pack(root, tmp_path / "c.tar")
    assert "lib/pipe" not in _names(tmp_path / "c.tar")


# ---------------------------------------------------------------------------- size cap
def test_over_the_cap_lists_the_five_biggest_files_with_sizes(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    sizes = {f"f{i}.bin": (i + 1) * 100_000 for i in range(8)}
    for name, size in sizes.items():
        (root / name).write_bytes(b"\0" * size)
    out = tmp_path / "c.tar"
    with pytest.raises(TooBig) as ei:
        pack(root, out, max_bytes=1_000_000)
    msg = str(ei.value)
    assert ei.value.biggest == [(f"f{i}.bin", sizes[f"f{i}.bin"]) for i in (7, 6, 5, 4, 3)]
    assert "f7.bin" in msg and "781.2 KB" in msg and "f2.bin" not in msg and "--max-code-mb" in msg
    assert not out.exists()   # nothing written
    assert pack(root, out, max_bytes=4_000_000).files == 8   # the flag's raise lets it through


# ---------------------------------------------------------------------------- hostile archives
def _tar(path: Path, members: list[tuple]) -> Path:
    """Hand-built tar: (name, type, linkname or data)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, extra in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = extra
                t.addfile(ti)
            elif kind == tarfile.REGTYPE:
                data = (extra or "x").encode()
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                t.addfile(ti)
    return path


REG, SYM, LNK, DIR = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE
HOSTILE = {
    "absolute": ([("/tmp/trainctl-pwned", REG, "")], "/tmp/trainctl-pwned"),
    "dotdot": ([("ok.py", REG, ""), ("../escape.txt", REG, "")], "../escape.txt"),
    "dotdot_deep": ([("a/../../escape.txt", REG, "")], "a/../../escape.txt"),
    "link_absolute": ([("l", SYM, "/etc/passwd")], "l"),
    "link_up": ([("l", SYM, "../")], "l"),
    "link_up_nested": ([("a/b/l", SYM, "../../../x")], "a/b/l"),
    "link_dotdot_after_name": ([("a/b/s", SYM, "../.."), ("l", SYM, "a/b/s/../escape.txt")], "l"),
    "write_through_link": ([("d", SYM, "."), ("d/x.txt", REG, "")], "d/x.txt"),
    "write_through_link_first": ([("d/x.txt", REG, ""), ("d", SYM, "sub")], "d/x.txt"),
    "hardlink": ([("h", LNK, "/etc/passwd")], "h"),
    "char_device": ([("dev", tarfile.CHRTYPE, None)], "dev"),
    "block_device": ([("blk", tarfile.BLKTYPE, None)], "blk"),
    "fifo": ([("fifo", tarfile.FIFOTYPE, None)], "fifo"),
    "duplicate": ([("a.py", REG, "1"), ("a.py", SYM, "/etc/passwd")], "a.py"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_check_archive_refuses_and_names_the_member(tmp_path, case):
    members, bad = HOSTILE[case]
    path = _tar(tmp_path / "h.tar", members)
    with pytest.raises(ArchiveError) as ei:
        check_archive(path)
    assert ei.value.member == bad and repr(bad) in str(ei.value)


def test_check_archive_refuses_what_is_not_a_plain_tar(tmp_path):
    (tmp_path / "junk").write_bytes(os.urandom(3000))
    with pytest.raises(ArchiveError, match="not a valid"):
        check_archive(tmp_path / "junk")
    src = _tree(tmp_path / "src", FILES)
    with tarfile.open(tmp_path / "c.tgz", "w:gz") as t:   # compressed: could be a bomb
        t.add(src, arcname=".")
    with pytest.raises(ArchiveError, match="not a valid"):
        check_archive(tmp_path / "c.tgz")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.stat(follow_symlinks=False).st_mtime_ns)
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("second_guard_only", [False, True], ids=["checked", "filter-only"])
def test_safe_unpack_never_writes_outside_dest(tmp_path, monkeypatch, case, second_guard_only):
    """Each hostile archive, unpacked into box/dest: nothing outside dest changes. With
    `filter-only`, check_archive is bypassed, so tarfile's data filter alone must hold."""
    if case == "absolute":   # point the absolute member into our sandbox, not /tmp
        members = [(str(tmp_path / "box" / "pwned"), REG, "")]
    else:
        members = HOSTILE[case][0]
    box = tmp_path / "box"
    (box / "dest").mkdir(parents=True)
    (box / "escape.txt").write_text("original")
    (box / "sub").mkdir()
    path = _tar(tmp_path / "h.tar", members)
    before = _snapshot(box)
    if second_guard_only:
        monkeypatch.setattr(codepack, "check_archive", lambda p: codepack.ArchiveInfo(0, 0))
    try:
        safe_unpack(path, box / "dest")
    except (ArchiveError, OSError):
        pass
    after = {k: v for k, v in _snapshot(box).items() if not k.startswith("dest")}
    assert after == {k: v for k, v in before.items() if not k.startswith("dest")}
    assert (box / "escape.txt").read_text() == "original"
    for p in (box / "dest").rglob("*"):   # whatever was written stays inside dest
        if p.is_symlink():
            assert os.path.realpath(p).startswith(str(box / "dest"))
        assert not (p.is_char_device() or p.is_block_device() or p.is_fifo())


def test_safe_unpack_refuses_a_dest_that_is_not_empty(tmp_path):
    pack(_tree(tmp_path / "src", FILES), tmp_path / "c.tar")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "old").write_text("x")
    with pytest.raises(FileExistsError):
        safe_unpack(tmp_path / "c.tar", tmp_path / "dest")
