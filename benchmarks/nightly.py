"""Nightly cost at archive scale: does a night with k new files cost like k files, or like N?

    python benchmarks/nightly.py --n 2000 --k 100 [--model knee-default|tiny|PATH] [--json]

Builds an archive of N small knee PNGs (copies of a few distinct synthetic images), scans it
once (night 1, with an HDF5 holding heatmaps), adds k new files and scans again (night 2). It
reports for night 2: wall time, bytes written to the outputs (appended bytes for a file
appended to, the whole size for a file rewritten), peak RSS, and the walk rate (discovery +
planning over all files, nothing read); and, as the yardstick, the same k files scanned alone
into fresh outputs. ``--model tiny`` uses a seeded two-member ``tiny_cnn`` package: it measures
the pipeline's nightly overhead at large N in minutes rather than the model's speed.
Everything runs in a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from osteoscan.scan.config import ScanConfig
from osteoscan.scan.pipeline import run_scan
from osteoscan.scan.plan import discover_files, plan_files, run_key_for
from osteoscan.scan.state import ScanState
from osteoscan.testing import synthetic

DISTINCT = 8  # distinct images, copied (discovery counts a hard-linked inode once)


def build_archive(root: Path, start: int, count: int, size: int) -> None:
    """``count`` PNGs named ``k<index>.png`` from ``start`` on, copies of a few images."""
    seeds = root / ".seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    for s in range(DISTINCT):
        if not (seeds / f"{s}.png").exists():
            synthetic.write_png(seeds / f"{s}.png", synthetic.synthetic_knee(size, seed=s))
    for i in range(start, start + count):
        shutil.copyfile(seeds / f"{i % DISTINCT}.png", root / "images" / f"k{i:07d}.png")


def output_files(cfg: ScanConfig) -> list[Path]:
    """The files a scan publishes: results CSV, flagged CSV, HDF5, heatmap PNGs."""
    out = Path(str(cfg.out))
    files = [out, out.with_name(out.stem + ".flagged.csv")]
    if cfg.hdf5 is not None:
        files.append(Path(str(cfg.hdf5)))
    if cfg.heatmaps_dir is not None and Path(cfg.heatmaps_dir).is_dir():
        files += sorted(Path(cfg.heatmaps_dir).iterdir())
    return files


def file_ids(files: list[Path]) -> dict[Path, tuple[int, int]]:
    """(inode, size) of each existing file."""
    out = {}
    for p in files:
        if p.exists():
            st = p.stat()
            out[p] = (st.st_ino, st.st_size)
    return out


def bytes_written(before: dict[Path, tuple[int, int]], after: dict[Path, tuple[int, int]]) -> int:
    """Bytes a run wrote to its outputs: the growth of a file appended to in place (same
    inode), the whole size of a file that is new or was replaced."""
    total = 0
    for path, (ino, size) in after.items():
        old = before.get(path)
        total += size - old[1] if old is not None and old[0] == ino else size
    return total


def walk_rate(cfg: ScanConfig) -> float:
    """Files/s for discovery + planning against the state (one stat per unchanged file)."""
    from osteoscan.manifest import read_manifest, resolve_package

    refs: list[str | Path | None] = [*cfg.models] or [None]  # none given: the default model
    manifests = [read_manifest(resolve_package(ref)) for ref in refs]
    key, rates = run_key_for(cfg, manifests), []
    with ScanState.open(Path(str(cfg.out)).with_name("results.state.sqlite")) as state:
        for _ in range(3):  # a warm cache: the best of three walks
            t0 = time.perf_counter()
            files, _ = discover_files(cfg, state.signatures())
            todo = plan_files(state, files, key, False)
            rates.append(len(files) / (time.perf_counter() - t0))
    assert not todo, "the walk is timed over an archive that is fully scanned"
    return max(rates)


def night(cfg: ScanConfig) -> dict[str, float]:
    """One scan: wall time, bytes written to the outputs and their growth, state growth."""
    state = Path(str(cfg.out)).with_name("results.state.sqlite")
    state_before = state.stat().st_size if state.exists() else 0
    before = file_ids(output_files(cfg))
    t0 = time.perf_counter()
    summary = run_scan(cfg)
    wall = time.perf_counter() - t0
    after = file_ids(output_files(cfg))
    return {
        "wall_s": round(wall, 2),
        "bytes_written": bytes_written(before, after),
        "bytes_added": sum(s for _, s in after.values()) - sum(s for _, s in before.values()),
        "state_growth": state.stat().st_size - state_before,
        "rows_new": summary.rows,
    }


def tiny_model(folder: Path, size: int) -> str:
    """A seeded two-member tiny_cnn package (``size``-px input) for overhead measurements."""
    from osteoscan.testing.packages import tiny_package

    return str(tiny_package(folder / "tiny-knee", size=size))


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="files already scanned")
    ap.add_argument("--k", type=int, default=100, help="new files on the second night")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--model", default=None,
                    help="model package, or 'tiny' (default: knee-default)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="osteoscan-nightly-") as tmp:
        root = Path(tmp) / "archive"
        (root / "images").mkdir(parents=True)
        build_archive(root, 0, args.n, args.size)
        model = tiny_model(Path(tmp), min(args.size, 224)) if args.model == "tiny" else args.model

        def cfg(paths: list[Path], out: Path) -> ScanConfig:
            return ScanConfig(paths=paths, out=out / "results.csv", hdf5=out / "results.h5",
                              models=[model] if model else [], quiet=True)  # fmt: skip

        nightly = cfg([root / "images"], Path(tmp) / "out")
        first = night(nightly)
        walk = walk_rate(nightly)
        build_archive(root, args.n, args.k, args.size)
        second = night(nightly)
        (root / "alone").mkdir()
        for p in sorted((root / "images").iterdir())[args.n :]:
            shutil.copyfile(p, root / "alone" / p.name)
        alone = night(cfg([root / "alone"], Path(tmp) / "alone-out"))
        out = {
            "n": args.n, "k": args.k, "night1": first, "night2": second, "k_alone": alone,
            "walk_files_per_s": round(walk),
            "walk_s": round((args.n + args.k) / walk, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "night2_wall_vs_k_alone": round(second["wall_s"] / alone["wall_s"], 2),
            "night2_bytes_vs_k_alone": round(second["bytes_written"] / alone["bytes_written"], 2),
            "night2_bytes_written_vs_added":
                round(second["bytes_written"] / max(second["bytes_added"], 1), 2),
            "night2_wall_vs_k_alone_plus_walk":
                round(second["wall_s"] / (alone["wall_s"] + (args.n + args.k) / walk), 2),
        }  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")


if __name__ == "__main__":  # workers start from a forkserver: guard the entry point
    main()
