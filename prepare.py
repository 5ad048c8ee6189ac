"""
A folder of MIDI files -> a filtered, de-duplicated, tokenized dataset on disk (paper §3.2
"Pretraining dataset"; official data handling: aria/datasets.py, build_mididict_dataset and
PretrainingDataset.build). "Official" is EleutherAI/aria @ b0486c8 and EleutherAI/aria-utils @ e122d03.

    python prepare.py ~/midi/ more.mid --out data/mine            # files and folders, recursive
    python prepare.py ~/midi/ --metadata meta.csv --out data/mine  # + the paper's composition cap
    python prepare.py --synthetic 300 --out data/synthetic         # no download: generated piano
    python prepare.py ~/midi/ --strict --out data/gen              # the generative finetune's stricter data

Output (`--out DIR`), published atomically when everything is written:
    train.bin, val.bin        uint16 token ids of all kept files, concatenated
    train.idx.npy, val.idx.npy  int64 offsets, file i is bin[idx[i]:idx[i+1]]
    meta.json                 vocabulary hash, counts, hours, settings
    report.json, files.jsonl  what was kept or dropped, and why (one line per input file)

Each file is tokenized as the official pretraining data was (aria/datasets.py, get_seqs): with <E>,
and with <D> about 100 tokens before its end, its random offset and prefix order drawn from a
generator seeded by the file's content, so a rerun gives identical bytes. Finetunes re-place <D> as
they need. The split is by content hash, so it does not depend on file order or worker count.
"""
import argparse
import csv
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import mido
import numpy as np

import tokenizer as T

# -----------------------------------------------------------------------------
# defaults. The paper names the heuristics (note density, pitch and duration entropy, silence,
# repetitive content) but not their thresholds, and the official config leaves its tests off
# (aria's config/config.json: every "data.tests" entry has "run": false), so these are set loose:
# on MAESTRO + POP909 + Pop1K7 + piano-midi.de they keep 4211 of 4229 files, dropping 4 recitals
# with >30 s pauses, 13 POP909 files whose pedal is never released (every note becomes the 5 s
# maximum) and one duplicate.
FILTERS = dict(
    min_notes=50,            # too short to learn from
    min_seconds=10.0,
    max_density=40.0,        # notes per second over the whole file: black MIDI (paper §3.2)
    min_pitch_entropy=2.0,   # bits over the pitch histogram: a few repeated keys
    min_dur_entropy=1.0,     # bits over duration tokens: constant durations (step-sequenced)
    max_silence=30.0,        # seconds with nothing sounding
    min_unique_ngrams=0.15,  # distinct/total pitch 8-grams: loops pasted over and over
    min_velocity_std=0.0,    # synthesized MIDI: near-constant velocities (off by default)
    max_timing_regularity=1.0,  # synthesized MIDI: share of inter-onset intervals that are one of
                                # the 3 most common values (off by default)
)
# --strict: the generative finetune's higher-quality data (paper §3.2 "Generative finetuning":
# tightened filters, no compositional duplicates, no transcriptions of synthesized MIDI). On 40
# random files per corpus, performances have timing regularity <= 0.54 (MAESTRO) / 0.80
# (Pianist8) and velocity std >= 6; POP909's quantized arrangements have a median of 0.82.
STRICT = dict(min_notes=200, min_seconds=30.0, max_density=25.0, min_pitch_entropy=3.0, min_dur_entropy=2.0,
              max_silence=10.0, min_unique_ngrams=0.3, min_velocity_std=5.0, max_timing_regularity=0.75)
MAX_PER_PIECE = 10           # paper §3.2: at most 10 files per opus/piece number ...
COMPOSER_CAP_MIN = 250       # ... for composers with more than 250 such tagged files
VAL_FRACTION = 0.02


# -----------------------------------------------------------------------------
# quality measures, computed from the tokenized file (times in ms after pedal folding)

def entropy(counts):
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c) if n else 0.0


def file_stats(ids):
    notes = [n for n in T.detokenize_notes(ids)[0] if n[4] != T.DRUM_CHANNEL]
    if not notes:
        return dict(notes=0, seconds=0.0, density=0.0, pitch_entropy=0.0, dur_entropy=0.0,
                    max_silence=0.0, unique_ngrams=0.0, velocity_std=0.0, timing_regularity=1.0)
    notes.sort()
    seconds = (max(n[1] for n in notes) - notes[0][0]) / 1000
    silence, reach = 0, notes[0][1]
    for start, end, *_ in notes:
        silence = max(silence, start - reach)
        reach = max(reach, end)
    pitches = [n[2] for n in notes]
    grams = [tuple(pitches[i:i + 8]) for i in range(len(pitches) - 7)]
    onsets = sorted({n[0] for n in notes})
    iois = Counter(b - a for a, b in zip(onsets, onsets[1:]))
    return dict(
        notes=len(notes), seconds=round(seconds, 3),
        density=round(len(notes) / max(seconds, 1e-3), 3),
        pitch_entropy=round(entropy(Counter(pitches).values()), 4),
        dur_entropy=round(entropy(Counter(n[1] - n[0] for n in notes).values()), 4),
        max_silence=silence / 1000,
        unique_ngrams=round(len(set(grams)) / len(grams), 4) if grams else 1.0,
        velocity_std=round(float(np.std([n[3] for n in notes])), 3),
        timing_regularity=round(sum(c for _, c in iois.most_common(3)) / max(1, sum(iois.values())), 4),
    )


def quality_problem(s, f):
    """The first failed filter as a short reason, or None."""
    checks = [
        (s["notes"] < f["min_notes"], f"fewer than {f['min_notes']} notes"),
        (s["seconds"] < f["min_seconds"], f"shorter than {f['min_seconds']} s"),
        (s["density"] > f["max_density"], f"denser than {f['max_density']} notes/s"),
        (s["pitch_entropy"] < f["min_pitch_entropy"], f"pitch entropy below {f['min_pitch_entropy']}"),
        (s["dur_entropy"] < f["min_dur_entropy"], f"duration entropy below {f['min_dur_entropy']}"),
        (s["max_silence"] > f["max_silence"], f"silence longer than {f['max_silence']} s"),
        (s["unique_ngrams"] < f["min_unique_ngrams"],
         f"repetitive (unique 8-grams below {f['min_unique_ngrams']})"),
        (s["velocity_std"] < f["min_velocity_std"],
         f"synthesized? velocity std below {f['min_velocity_std']}"),
        (s["timing_regularity"] > f["max_timing_regularity"],
         f"synthesized? timing regularity above {f['max_timing_regularity']}"),
    ]
    return next((why for bad, why in checks if bad), None)


def process(path, filters, pedal):
    """Worker: one file -> (path, ids or None, reason, stats, content hash)."""
    try:
        score = T.load_midi(path)
        ids = T.tokenize(score, dim=False, pedal=pedal)  # pedal mode refuses non-piano files
    except T.TokenizerError as e:
        return path, None, "unreadable: " + str(e).split(": ", 1)[-1], None, None
    except Exception as e:  # a mido corner case we have not seen: report it, keep going
        return path, None, f"unreadable: {type(e).__name__}: {e}".splitlines()[0], None, None
    digest = hashlib.sha1(np.asarray(ids, dtype=np.uint16).tobytes()).hexdigest()
    stats = file_stats(ids)
    why = quality_problem(stats, filters)
    if why:
        return path, None, why, stats, digest
    ids = T.tokenize(score, rng=random.Random(digest), pedal=pedal)  # with <D>, as the official data
    return path, np.asarray(ids, dtype=np.uint16), None, stats, digest


# -----------------------------------------------------------------------------
# inputs and metadata

def find_midi(paths):
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(str(x) for x in p.rglob("*")
                            if x.suffix.lower() in (".mid", ".midi") and x.is_file())
        elif p.is_file():
            files.append(str(p))
        else:
            missing.append(str(p))
    return files, missing


def read_metadata(path):
    """CSV (columns path|file|midi_filename, composer, opus, piece) or JSON {path: {...}}
    -> {key: {"composer", "opus", "piece"}}, keyed by the path as written and by basename."""
    p = Path(path)
    if not p.is_file():
        sys.exit(f"prepare.py: metadata file {p} does not exist")
    try:
        if p.suffix.lower() == ".json":
            rows = [{"path": k, **v} for k, v in json.loads(p.read_text()).items()]
        else:
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
    except (ValueError, AttributeError, TypeError, csv.Error, UnicodeDecodeError) as e:
        sys.exit(f"prepare.py: cannot read metadata {p}: {e}")
    meta = {}
    for r in rows:
        key = r.get("path") or r.get("file") or r.get("midi_filename") or r.get("midi")
        if not key:
            sys.exit(f"prepare.py: metadata {p} needs a path (or file) column")
        entry = {k: (r.get(k) or "").strip() for k in ("composer", "opus", "piece")}
        meta[key] = meta[Path(key).name] = entry
    return meta


def lookup(meta, path, roots):
    for root in roots:
        try:
            rel = str(Path(path).relative_to(root))
        except ValueError:
            continue
        if rel in meta:
            return meta[rel]
    return meta.get(path) or meta.get(Path(path).name)


def composition_cap(files, meta, roots, per_piece, composer_min):
    """Paper §3.2: composers with > composer_min files tagged with an opus and/or piece number
    keep at most per_piece files per (opus, piece) and lose their untagged files.
    Returns {path: reason} for the files to drop (the first ones in path order are kept)."""
    info = {f: lookup(meta, f, roots) or {} for f in files}
    tagged = Counter(m["composer"] for m in info.values()
                     if m.get("composer") and (m.get("opus") or m.get("piece")))
    big = {c for c, n in tagged.items() if n > composer_min}
    drop, seen = {}, Counter()
    for f in files:
        m = info[f]
        if m.get("composer") not in big:
            continue
        if not (m.get("opus") or m.get("piece")):
            drop[f] = f"composition cap: untagged file of {m['composer']}"
            continue
        key = (m["composer"], m.get("opus"), m.get("piece"))
        seen[key] += 1
        if seen[key] > per_piece:
            why = f"composition cap: more than {per_piece} files of {m['composer']} {key[1]} {key[2]}"
            drop[f] = why.strip()
    return drop


# -----------------------------------------------------------------------------
# a procedurally generated piano corpus, so the quick start needs no download

PROGRESSIONS = [[0, 4, 5, 3], [0, 5, 3, 4], [0, 3, 4, 0], [5, 3, 0, 4], [0, 5, 1, 4], [1, 4, 0, 0]]
MAJOR, MINOR = [0, 2, 4, 5, 7, 9, 11], [0, 2, 3, 5, 7, 8, 10]


def synthetic_piece(rng):
    """Chords, arpeggios and a melody over a progression, with human-like timing jitter,
    phrase-shaped velocities and a pedal change per bar. Returns a mido.MidiFile."""
    tonic, scale = rng.randint(48, 59), rng.choice([MAJOR, MINOR])
    beat = 60000 / rng.uniform(60, 140)  # ms per beat
    style = rng.choice(["block", "arpeggio", "alberti"])
    prog = rng.choice(PROGRESSIONS)
    bars = rng.randint(10, 24)
    notes, pedals = [], []  # (start_ms, end_ms, pitch, velocity), (ms, value)

    def pitch(degree, octave=0):
        return tonic + 12 * (octave + degree // 7) + scale[degree % 7]

    def jitter(t):
        return max(0.0, t + rng.gauss(0, 8))

    melody = rng.randint(7, 11)
    for bar in range(bars):
        t0, root = bar * 4 * beat, prog[bar % len(prog)]
        loud = 58 + 22 * math.sin(math.pi * (bar % 8) / 8)  # phrase arch over 8 bars
        chord = [pitch(root + k, -1) for k in (0, 2, 4)]
        if style == "block":
            for b in (0, 2):
                for p in chord:
                    notes.append((jitter(t0 + b * beat), t0 + (b + 1.9) * beat, p,
                                  loud - 12 + rng.gauss(0, 5)))
        else:
            order = chord + [chord[1]] if style == "arpeggio" else [chord[0], chord[2], chord[1], chord[2]]
            for i in range(8):
                t = t0 + i * beat / 2
                notes.append((jitter(t), t + beat * 0.45, order[i % 4], loud - 15 + rng.gauss(0, 5)))
        t = t0
        while t < t0 + 4 * beat - 1:
            d = rng.choice([0.5, 1, 1, 1.5, 2]) * beat
            melody = min(max(melody + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 5), 16)
            notes.append((jitter(t), t + d * 0.95, pitch(melody), loud + rng.gauss(0, 6)))
            t += d
        pedals += [(t0 + 30, 127), (t0 + 4 * beat - 25, 0)]
    notes.append((bars * 4 * beat, bars * 4 * beat + 2 * beat, pitch(0, -1), 50))  # final tonic

    tpb, tempo = 480, 500000  # ms -> ticks at 120 bpm: 0.96 ticks per ms
    to_tick = lambda ms: int(round(ms * tpb * 1000 / tempo))
    events = [(to_tick(s), 1, mido.Message("note_on", note=p, velocity=int(min(max(v, 1), 127))))
              for s, e, p, v in notes]
    events += [(to_tick(e), 0, mido.Message("note_off", note=p)) for s, e, p, v in notes]
    events += [(to_tick(t), 2, mido.Message("control_change", control=64, value=v)) for t, v in pedals]
    events.sort(key=lambda e: (e[0], e[1]))
    track, now = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=tempo)]), 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    mid = mido.MidiFile(type=0, ticks_per_beat=tpb)
    mid.tracks.append(track)
    return mid


def write_synthetic(n, folder, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        synthetic_piece(rng).save(folder / f"synthetic_{i:05d}.mid")


# -----------------------------------------------------------------------------
# main

def main():
    ap = argparse.ArgumentParser(description="MIDI files -> tokenized Aria dataset.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("paths", nargs="*", help="MIDI files and folders (searched recursively)")
    ap.add_argument("--out", required=True, help="output dataset folder")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="generate this many piano pieces into OUT/midi and use them")
    ap.add_argument("--metadata", default=None,
                    help="CSV/JSON: path, composer, opus, piece (enables the composition cap)")
    ap.add_argument("--max_per_piece", type=int, default=None,
                    help=f"composition cap: files per opus/piece (default {MAX_PER_PIECE}, --strict 1)")
    ap.add_argument("--composer_min", type=int, default=None,
                    help=f"composition cap applies above this many tagged files (default {COMPOSER_CAP_MIN}, "
                    "--strict 0)")
    for k, v in FILTERS.items():
        ap.add_argument(f"--{k}", type=type(v), default=None,
                        help=f"quality filter threshold (default {v}, --strict {STRICT.get(k, v)})")
    ap.add_argument("--strict", action="store_true",
                    help="the generative finetune's settings: STRICT thresholds, synthesized-MIDI filter, "
                    "and with --metadata at most one file per composition")
    ap.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                    help="share of files in the validation split")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    ap.add_argument("--force", action="store_true", help="replace an existing dataset in OUT")
    ap.add_argument("--pedal", action="store_true",
                    help="tokenize with pedal tokens (17,729 ids, the official demo's vocabulary; "
                    "piano only): for models that lift and press the pedal")
    args = ap.parse_args()
    if not 0 <= args.val_fraction < 1:
        sys.exit(f"prepare.py: --val_fraction {args.val_fraction}: expected a share in [0, 1), "
                 "training needs files")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"prepare.py: --out {out} is a file, not a folder")
    if (out / "meta.json").exists() and not args.force:
        sys.exit(f"prepare.py: {out} already holds a dataset (use --force to replace it)")
    roots = [Path(p) for p in args.paths]
    if args.synthetic:
        write_synthetic(args.synthetic, out / "midi", args.seed)
        roots.append(out / "midi")
    if not roots:
        sys.exit("prepare.py: give MIDI files or folders, or --synthetic N")
    files, missing = find_midi(roots)
    for m in missing:
        print(f"prepare.py: {m}: no such file or directory (skipped)", file=sys.stderr)
    if not files:
        sys.exit(f"prepare.py: no MIDI files (*.mid, *.midi) found in {' '.join(map(str, roots))}")

    base = {**FILTERS, **STRICT} if args.strict else FILTERS
    filters = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in FILTERS}
    # --strict "removed all identified compositional duplicates" (paper §3.2); given values win, as for
    # the filters
    per_piece, composer_min = (1, 0) if args.strict else (MAX_PER_PIECE, COMPOSER_CAP_MIN)
    args.max_per_piece = per_piece if args.max_per_piece is None else args.max_per_piece
    args.composer_min = composer_min if args.composer_min is None else args.composer_min
    capped = {}
    if args.metadata:
        capped = composition_cap(files, read_metadata(args.metadata), roots, args.max_per_piece,
                                 args.composer_min)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    bins = {s: open(partial / f"{s}.bin", "wb") for s in ("train", "val")}
    offsets = {"train": [0], "val": [0]}
    seen, reasons = set(), Counter()
    hours = defaultdict(float)
    t0, last = time.time(), 0.0
    done = 0
    log = open(partial / "files.jsonl", "w")
    todo = [f for f in files if f not in capped]
    for f, why in capped.items():
        reasons[why.split(":")[0]] += 1
        log.write(json.dumps({"file": f, "kept": False, "reason": why}) + "\n")
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(max(1, args.workers)) as pool:
        work = functools.partial(process, filters=filters, pedal=args.pedal)
        for path, ids, why, stats, digest in pool.imap(work, todo, chunksize=4):
            done += 1
            if why is None and digest in seen:
                why = "duplicate of an earlier file"
            if why is None:
                seen.add(digest)
                split = "val" if int(digest[:8], 16) % 10000 < args.val_fraction * 10000 else "train"
                bins[split].write(ids.tobytes())
                offsets[split].append(offsets[split][-1] + len(ids))
                hours[split] += stats["seconds"] / 3600
                row = {"file": path, "kept": True, "split": split, "tokens": len(ids), **stats}
                log.write(json.dumps(row) + "\n")
            else:
                if digest and why.startswith("duplicate"):
                    seen.add(digest)
                reasons[why.split(" (")[0] if why.startswith("unreadable") else why] += 1
                log.write(json.dumps({"file": path, "kept": False, "reason": why, **(stats or {})}) + "\n")
            now = time.time()
            if now - last > 2 or done == len(todo):
                last, rate = now, done / max(now - t0, 1e-9)
                kept = len(offsets["train"]) + len(offsets["val"]) - 2
                print(f"prepare: {done}/{len(todo)} files  {rate:.0f} files/s  "
                      f"ETA {(len(todo) - done) / rate:.0f}s  kept {kept}  dropped {done - kept}",
                      file=sys.stderr, flush=True)
    log.close()
    for s, fh in bins.items():
        fh.close()
        np.save(partial / f"{s}.idx.npy", np.asarray(offsets[s], dtype=np.int64))

    counts = {s: {"files": len(offsets[s]) - 1, "tokens": offsets[s][-1], "hours": round(hours[s], 2)}
              for s in bins}
    if counts["train"]["files"] == 0:
        shutil.rmtree(partial)
        if counts["val"]["files"]:  # every kept file drew the validation split: not a filter problem
            sys.exit(f"prepare.py: all {counts['val']['files']} kept files fell in the validation split "
                     f"(--val_fraction {args.val_fraction}), none in training: lower --val_fraction; "
                     "nothing written")
        sys.exit(f"prepare.py: no file survived ({dict(reasons)}); nothing written")
    meta = {"vocab_hash": T.PEDAL_VOCAB_HASH if args.pedal else T.VOCAB_HASH, "pedal": args.pedal,
            "vocab_size": T.PEDAL_VOCAB_SIZE if args.pedal else T.VOCAB_SIZE, "dtype": "uint16",
            "splits": counts, "inputs": [str(r) for r in roots], "filters": filters, "strict": args.strict,
            "val_fraction": args.val_fraction,
            "composition_cap": {"metadata": args.metadata, "max_per_piece": args.max_per_piece,
                                "composer_min": args.composer_min} if args.metadata else None}
    report = {"files": len(files), "kept": sum(c["files"] for c in counts.values()),
              "dropped": sum(reasons.values()), "dropped_by_reason": dict(reasons.most_common()),
              "splits": counts}
    (partial / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    # publish: the old dataset (if --force) goes, then the finished one takes its name; meta.json goes
    # first and comes last, as a dataset is complete when it exists
    data = ["train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "report.json", "files.jsonl"]
    if out.exists():
        for name in ["meta.json"] + data:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in data + ["meta.json"]:
        os.replace(partial / name, out / name)
    partial.rmdir()
    print(f"prepare: {report['kept']} of {len(files)} files kept "
          f"({counts['train']['files']} train / {counts['val']['files']} val, "
          f"{counts['train']['tokens'] + counts['val']['tokens']:,} tokens, "
          f"{counts['train']['hours'] + counts['val']['hours']:.1f} h) -> {out}")
    if reasons:
        print("prepare: dropped " + ", ".join(f"{n} {why}" for why, n in reasons.most_common()))
    if not counts["val"]["files"]:
        print(f"prepare: the validation split is empty (--val_fraction {args.val_fraction} of "
              f"{report['kept']} files): training runs without a validation loss", file=sys.stderr)


if __name__ == "__main__":
    main()
