"""
The performance figures that README reports, one subcommand per component.

    python bench.py tokenizer [FILES_OR_DIRS...]   # notes/s: mido parse vs our parse+tokenize, etc.

Each prints a small table and the median over --repeats runs of the whole file set.
This is a benchmark, not a test: run it on a quiet machine.
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


def midi_files(paths, limit=None):
    files = []
    for p in map(Path, paths):
        files += sorted(x for x in p.rglob("*") if x.suffix.lower() in (".mid", ".midi")) if p.is_dir() else [p]
    return files[:limit] if limit else files


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tokenizer(args):
    import mido
    import tokenizer as T

    default = [SHARED / "aria" / "midi"] if not args.paths else args.paths
    files = midi_files(default, args.limit)
    if not files:
        sys.exit(f"bench.py: no MIDI files found in {' '.join(map(str, default))}")
    data = [f.read_bytes() for f in files]  # from memory: measure parsing, not the disk
    import io
    scores = [T.load_midi(d) for d in data]
    n_notes = sum(len(s.notes) for s in scores)
    ids = [T.tokenize(s) for s in scores]
    n_tokens = sum(map(len, ids))
    rng = random.Random(0)

    rows = [
        ("mido.MidiFile (parse only)", lambda: [mido.MidiFile(file=io.BytesIO(d)) for d in data]),
        ("load_midi (parse + pair notes)", lambda: [T.load_midi(d) for d in data]),
        ("tokenize (from a parsed Score)", lambda: [T.tokenize(s) for s in scores]),
        ("load_midi + tokenize", lambda: [T.tokenize(T.load_midi(d)) for d in data]),
        ("detokenize_notes", lambda: [T.detokenize_notes(x) for x in ids]),
        ("detokenize -> MidiFile", lambda: [T.detokenize(x) for x in ids]),
        ("augment (tempo+pitch+velocity)", lambda: [T.augment(x, rng) for x in ids]),
    ]
    print(f"tokenizer: {len(files)} files, {n_notes:,} notes, {n_tokens:,} tokens; median of {args.repeats}")
    print(f"{'stage':34s} {'ms':>9s} {'files/s':>9s} {'notes/s':>10s} {'× mido':>7s}")
    base = None
    for name, fn in rows:
        t = timed(fn, args.repeats)
        base = base or t
        print(f"{name:34s} {t * 1e3:9.1f} {len(files) / t:9.1f} {n_notes / t:10,.0f} {t / base:7.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tokenizer", help="tokenizer notes/s against mido's parse",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", help="MIDI files or folders (default: ../shared/aria/midi)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many files")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.set_defaults(fn=bench_tokenizer)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.fn(args)


if __name__ == "__main__":
    main()
