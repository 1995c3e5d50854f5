"""Artifact store throughput over loopback: a real `trainctl server` process with the
directory store, clients using trainctl.artifact_io (what the CLI, workers and SDK use).

    python bench/artifacts.py            # ~1 min; --rounds N, --tree-mb, --file-mb

1. A 50 MB code-like tree (a few thousand source-sized files plus some data files),
   packed with trainctl.codepack.pack, uploaded as ARTIFACT_CODE and downloaded back:
   MB/s of each (the client's hashing, the server's checks incl. the archive's
   member-by-member check, fsync and rename on the server included). Target >= 100 MB/s.
2. A 200 MB checkpoint (random bytes) uploaded by an attached run (run token) and
   downloaded: MB/s. Target >= 100 MB/s.
3. A second submit of the unchanged tree through Client.upload_code (what `submit --code`
   runs): the folder scanned, found unchanged since it was last packed, Stat hit, nothing
   packed or sent. Seconds; target <= 0.5 s.
Also the server's peak RSS (VmHWM): uploads and downloads stream, so it must not grow by
the file sizes. Each figure is the median of --rounds rounds (best in brackets).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from _common import Cluster, machine, median, rss_kb, table  # noqa: E402

from trainctl import artifact_io  # noqa: E402
from trainctl.client.sdk import Client  # noqa: E402
from trainctl.codepack import pack  # noqa: E402
from trainctl.v1 import trainctl_pb2 as pb  # noqa: E402
from trainctl.v1 import trainctl_pb2_grpc as pb_grpc  # noqa: E402
from trainctl.wire import struct_from_dict  # noqa: E402

MB = 1 << 20
TARGET_MBS = 100.0
TARGET_RESUBMIT_S = 0.5
WORDS = ("def", "return", "self", "import", "torch", "model", "loss", "for", "in", "range", "batch", "optimizer",
         "step", "if", "else", "None", "True", "lr", "x", "y", "=", "(", ")", ":", "+", "*", "0.1", "[", "]")


def make_tree(root: Path, total_mb: int, seed: int = 0) -> tuple[int, int]:
    """A project-like folder: ~60 % of the bytes in source-sized files, the rest in a few
    data/weight files. Returns (files, bytes)."""
    rng = random.Random(seed)
    total, files, target = 0, 0, total_mb * MB
    src_bytes = int(target * 0.6)
    while total < src_bytes:
        d = root / f"pkg{files % 40}" / f"sub{files % 7}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(2_000, 30_000)
        text = " ".join(rng.choice(WORDS) for _ in range(n // 4))[:n] + "\n"
        (d / f"mod{files}.py").write_text(text)
        total += len(text)
        files += 1
    i = 0
    while total < target:
        n = min(8 * MB, target - total)
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"blob{i}.bin").write_bytes(os.urandom(n))
        total += n
        files += 1
        i += 1
    return files, total


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree-mb", type=int, default=50)
    ap.add_argument("--file-mb", type=int, default=200)
    args = ap.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="trainctl-bench-artifacts-") as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "project"
        files, tree_bytes = make_tree(tree, args.tree_mb)
        big = tmp / "ckpt.pt"
        with open(big, "wb") as f:
            for _ in range(args.file_mb):
                f.write(os.urandom(MB))
        print(f"tree: {files} files, {tree_bytes / MB:.1f} MB; checkpoint file: {args.file_mb} MB", flush=True)
        (tmp / "cluster").mkdir()
        with Cluster(tmp / "cluster", server_args=["--artifacts", str(tmp / "store")]) as cluster:
            channel = grpc.insecure_channel(cluster.address)
            stub = pb_grpc.ArtifactsStub(channel)
            experiments = pb_grpc.ExperimentsStub(channel)
            _, rss_start = rss_kb(cluster.server.pid)
            rows = {k: [] for k in ("code_up", "code_down", "ckpt_up", "ckpt_down", "pack", "resubmit")}
            archive_mb = 0.0
            for r in range(args.rounds):
                # Each round stores new bytes (a changed file), so the upload is a real one.
                (tree / f"round{r}.py").write_text(f"ROUND = {r}\n")
                archive = tmp / f"code-{r}.tar"
                t_pack, _ = timed(pack, tree, archive, max_bytes=4 * args.tree_mb * MB)
                archive_mb = archive.stat().st_size / MB
                t, rec = timed(artifact_io.upload, stub, archive, pb.Artifact(kind=pb.ARTIFACT_CODE))
                rows["code_up"].append(archive_mb / t)
                t, _ = timed(artifact_io.download, stub, pb.ArtifactRef(sha256=rec.sha256), tmp / "back.tar")
                rows["code_down"].append(archive_mb / t)
                rows["pack"].append(t_pack)

                # A second submit of the unchanged tree, as `trainctl submit --code` does it
                # (Client.upload_code): the first packs it (the server has it: no upload) and
                # remembers the tree; the second only scans the folder and asks (Stat).
                with Client(cluster.address) as client:
                    first = client.upload_code(tree, max_bytes=4 * args.tree_mb * MB)
                    assert first.sha256 == rec.sha256 and not first.uploaded, "the unchanged tree packed to other bytes"
                    t, again = timed(client.upload_code, tree, max_bytes=4 * args.tree_mb * MB)
                    assert again.sha256 == rec.sha256 and not again.uploaded
                rows["resubmit"].append(t)

                a = experiments.Attach(pb.AttachRequest(name=f"bench-{r}", config=struct_from_dict({})))
                with open(big, "r+b") as f:  # new bytes each round (a new checkpoint)
                    f.write(os.urandom(64))
                t, ck = timed(artifact_io.upload, stub, big, pb.Artifact(
                    kind=pb.ARTIFACT_CHECKPOINT, experiment_id=a.experiment.id, attempt=a.attempt, step=100,
                    name="ckpt-100-a1.pt"), run_token=a.run_token)
                rows["ckpt_up"].append(args.file_mb / t)
                t, _ = timed(artifact_io.download, stub, pb.ArtifactRef(experiment_id=a.experiment.id,
                                                                        name="ckpt-100-a1.pt"), tmp / "back.pt")
                rows["ckpt_down"].append(args.file_mb / t)
                print(f"round {r + 1}: code {rows['code_up'][-1]:.0f}/{rows['code_down'][-1]:.0f} MB/s up/down, "
                      f"checkpoint {rows['ckpt_up'][-1]:.0f}/{rows['ckpt_down'][-1]:.0f} MB/s, "
                      f"resubmit {rows['resubmit'][-1]:.3f} s (pack {t_pack:.3f} s)", flush=True)
            _, rss_peak = rss_kb(cluster.server.pid)
            channel.close()

    def mbs(key, label, size):
        m = median(rows[key])
        return [label, size, f"{m:.0f} [{max(rows[key]):.0f}]", f">= {TARGET_MBS:.0f} MB/s", f"{m / TARGET_MBS:.2f}",
                "MET" if m >= TARGET_MBS else "not met"]

    rs = median(rows["resubmit"])
    table(["what", "size", "MB/s or s, median [best]", "target", "ratio to target", "status"], [
        mbs("code_up", "code archive upload", f"{archive_mb:.1f} MB"),
        mbs("code_down", "code archive download", f"{archive_mb:.1f} MB"),
        mbs("ckpt_up", "checkpoint upload", f"{args.file_mb} MB"),
        mbs("ckpt_down", "checkpoint download", f"{args.file_mb} MB"),
        ["unchanged tree again (scan + Stat)", f"{files} files", f"{rs:.3f} s [{min(rows['resubmit']):.3f}]",
         f"<= {TARGET_RESUBMIT_S} s", f"{TARGET_RESUBMIT_S / rs:.2f}", "MET" if rs <= TARGET_RESUBMIT_S else "not met"],
    ], title=f"artifact store, directory backend, loopback, {args.rounds} rounds")
    print(f"pack alone: median {median(rows['pack']):.3f} s; server peak RSS {rss_start / 1024:.0f} MB at start -> "
          f"{rss_peak / 1024:.0f} MB after moving {args.rounds * (2 * archive_mb + 2 * args.file_mb):.0f} MB",
          flush=True)


if __name__ == "__main__":
    main()
