"""prepare.py through its CLI: the quality and synthesized-MIDI filters, --strict, the --metadata
composition cap, --force, and an interrupted run. MIDI is made here (mido), small and fast."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mido

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def prepare(*args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args), "--workers", "1"],
                       capture_output=True, text=True, env=ENV, timeout=120, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def decisions(out):
    """file name -> its line of files.jsonl (kept or not, why, statistics)."""
    return {Path(d["file"]).name: d for d in map(json.loads, open(Path(out) / "files.jsonl"))}


def write_midi(path, notes):
    """notes (start_ms, end_ms, pitch, velocity) -> a piano file at 1 tick = 1 ms."""
    events = [(s, 1, mido.Message("note_on", note=p, velocity=v)) for s, e, p, v in notes]
    events += [(e, 0, mido.Message("note_off", note=p)) for s, e, p, v in notes]
    events.sort(key=lambda e: (e[0], e[1]))
    mid, now = mido.MidiFile(type=0, ticks_per_beat=500), 0
    mid.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    for tick, _, msg in events:
        mid.tracks[0].append(msg.copy(time=tick - now))
        now = tick
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mid.save(path)


def performance(path, seed, n=300, regular=False, velocity=None, pitch=None, dur=None, pause_at=None):
    """A human-like line: varied rhythm with timing jitter, varied velocities and durations, a pitch
    walk; each argument makes one property machine-like (or adds a long pause)."""
    rng = random.Random(seed)
    notes, t, p = [], 1000.0, 60
    for i in range(n):
        if i == pause_at:
            t += 35000
        step = rng.choice([-4, -3, -2, -1, 1, 2, 3, 4])
        p = p + step if 40 <= p + step <= 84 else p - step  # never the same pitch twice in a row
        start = round(t)
        notes.append((start, start + (dur or rng.choice([80, 120, 180, 250, 400, 600, 900])),
                      pitch or p, velocity or rng.randint(40, 100)))
        t += 150 if regular else rng.choice([90, 140, 200, 260, 330, 420]) + rng.gauss(0, 12)
    write_midi(path, notes)


def test_quality_and_synthesized_midi_filters(tmp_path):
    src = tmp_path / "in"
    performance(src / "human.mid", 0)
    performance(src / "flat_velocity.mid", 1, velocity=64)   # synthesized: constant velocity
    performance(src / "grid.mid", 2, regular=True)           # synthesized: every onset 150 ms apart
    performance(src / "pause.mid", 3, pause_at=150)          # a 35 s pause in the middle
    performance(src / "one_pitch.mid", 4, pitch=60)          # one key struck over and over
    performance(src / "one_duration.mid", 5, dur=200)        # every note 200 ms long
    prepare(src, "--out", tmp_path / "default")
    d = decisions(tmp_path / "default")
    assert {n for n in d if d[n]["kept"]} == {"human.mid", "flat_velocity.mid", "grid.mid"}  # synth filter off
    assert d["pause.mid"]["reason"] == "silence longer than 30.0 s"
    assert d["one_pitch.mid"]["reason"] == "pitch entropy below 2.0"
    assert d["one_duration.mid"]["reason"] == "duration entropy below 1.0"
    # --strict turns the synthesized-MIDI filter on; a threshold given explicitly still wins over it
    prepare(src, "--out", tmp_path / "strict", "--strict", "--max_silence", "40")
    d = decisions(tmp_path / "strict")
    assert {n for n in d if d[n]["kept"]} == {"human.mid", "pause.mid"}
    assert d["flat_velocity.mid"]["reason"] == "synthesized? velocity std below 5.0"
    assert d["grid.mid"]["reason"] == "synthesized? timing regularity above 0.75"
    meta = json.loads((tmp_path / "strict" / "meta.json").read_text())
    assert meta["strict"] and meta["filters"]["min_notes"] == 200 and meta["filters"]["max_silence"] == 40


def test_metadata_composition_cap(tmp_path):
    src = tmp_path / "in"
    tags = {  # path under src: (composer, opus, piece)
        "chopin/op64_a.mid": ("chopin", "64", "1"), "chopin/op64_b.mid": ("chopin", "64", "1"),
        "chopin/op64_c.mid": ("chopin", "64", "1"), "chopin/op64_2.mid": ("chopin", "64", "2"),
        "chopin/op10.mid": ("chopin", "10", ""), "chopin/untagged.mid": ("chopin", "", ""),
        "satie/a.mid": ("satie", "", ""), "satie/b.mid": ("satie", "1", ""),
    }
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "composer", "opus", "piece"])
        for i, (name, tag) in enumerate(sorted(tags.items())):
            performance(src / name, 10 + i, n=120)
            w.writerow([name, *tag])
    # chopin has 5 files tagged with an opus or piece (> 2): at most 2 per (opus, piece), none untagged;
    # satie has 1 (not > 2) and keeps all; the first files in path order are kept
    prepare(src, "--out", tmp_path / "ds", "--metadata", tmp_path / "meta.csv", "--composer_min", "2",
            "--max_per_piece", "2")
    d = decisions(tmp_path / "ds")
    assert {n for n in d if not d[n]["kept"]} == {"op64_c.mid", "untagged.mid"}
    assert d["op64_c.mid"]["reason"] == "composition cap: more than 2 files of chopin 64 1"
    assert d["untagged.mid"]["reason"] == "composition cap: untagged file of chopin"
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["kept"] == 6 and report["dropped_by_reason"] == {"composition cap": 2}
    # --strict: one file per composition; a --composer_min given explicitly wins over its 0, so satie keeps both
    prepare(src, "--out", tmp_path / "strict", "--metadata", tmp_path / "meta.csv", "--strict", "--composer_min", "2",
            "--min_notes", "100", "--min_seconds", "20")
    d = decisions(tmp_path / "strict")
    assert {n for n in d if d[n]["kept"]} == {"op64_2.mid", "op64_a.mid", "op10.mid", "a.mid", "b.mid"}
    (tmp_path / "bad.json").write_text('{"chopin/op10.mid": "chopin"}')  # values must be objects
    r = prepare(src, "--out", tmp_path / "x", "--metadata", tmp_path / "bad.json", ok=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot read metadata" in r.stderr


def test_force_replaces_a_dataset_and_its_absence_refuses(tmp_path):
    for i in range(2):
        performance(tmp_path / "old" / f"old{i}.mid", 20 + i)
    performance(tmp_path / "new" / "new.mid", 30)
    out = tmp_path / "ds"
    prepare(tmp_path / "old", "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = prepare(tmp_path / "new", "--out", out, ok=False)
    assert r.returncode != 0 and r.stderr.strip() == f"prepare.py: {out} already holds a dataset (use --force to replace it)"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    prepare(tmp_path / "new", "--out", out, "--force")
    assert set(decisions(out)) == {"new.mid"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"] == [str(tmp_path / "new")] and sum(s["files"] for s in meta["splits"].values()) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(before) and not (tmp_path / "ds.partial").exists()
    r = prepare(tmp_path / "new", "--out", out / "meta.json", ok=False)  # an existing file is no output folder
    assert r.returncode == 1 and r.stderr == f"prepare.py: --out {out / 'meta.json'} is a file, not a folder\n"


def big_midi(path, notes=150_000):
    """A long file written as raw bytes (fast to make, about a second to parse): the run is still busy with it."""
    events = b"".join(bytes([0, 0x90, 40 + i % 40, 64, 10, 0x80, 40 + i % 40, 64]) for i in range(256))
    track = events * (notes // 256) + b"\x00\xff\x2f\x00"
    Path(path).write_bytes(b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
                          + (500).to_bytes(2, "big") + b"MTrk" + len(track).to_bytes(4, "big") + track)


def test_interrupted_run_leaves_no_dataset_and_a_rerun_completes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "ds"
    for i in range(3):
        performance(src / f"a{i}.mid", 40 + i, n=120)
    big_midi(src / "z_long.mid")
    cmd = [sys.executable, str(ROOT / "prepare.py"), str(src), "--out", str(out), "--workers", "1"]
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # its own process group: the run and its workers
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ds.partial").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.2)
        assert p.poll() is None, "the run ended before it could be interrupted"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert (tmp_path / "ds.partial").is_dir() and not (out / "meta.json").exists()
    (src / "z_long.mid").unlink()  # the rerun skips the slow file, only to keep the test short
    prepare(src, "--out", out)  # no --force needed: nothing was published
    assert json.loads((out / "report.json").read_text())["kept"] == 3 and not (tmp_path / "ds.partial").exists()
