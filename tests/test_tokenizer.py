"""tokenizer.py: official ids (goldens in ../shared), round trips, augmentation, bad input, CLI."""
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402

SHARED = ROOT.parent / "shared" / "aria"
GOLDEN = SHARED / "golden"
MIDI = SHARED / "midi"
needs_shared = pytest.mark.skipif(not GOLDEN.is_dir(), reason="../shared/aria not present")
FILES = sorted(p.name for p in MIDI.glob("*.mid")) if MIDI.is_dir() else []


def golden(name):
    return json.loads((GOLDEN / "tokenizer" / name).read_text())


def same_up_to_prefix_order(ids, ref, n_prefix):
    return sorted(ids[:n_prefix]) == sorted(ref[:n_prefix]) and list(ids[n_prefix:]) == list(ref[n_prefix:])


# -- official compatibility ---------------------------------------------------------------

@needs_shared
def test_vocab_and_quantizers_match_official():
    v = golden("vocab.json")
    assert T.VOCAB_SIZE == v["vocab_size"] == 17727 and T.PAD_ID == v["pad_id"]
    assert [list(t) if isinstance(t, tuple) else t for t in T.VOCAB] == v["tokens"]
    q = golden("quantizers.json")
    assert T.VELOCITY_Q == q["velocity"]
    assert T.ONSET_Q == q["onset_ms_0_to_4999"]
    assert [T.quantize_dur(x) for x in range(6001)] == q["dur_ms_0_to_6000"]


@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_ids_match_official(name):
    ref = json.loads((GOLDEN / "tokens.json").read_text())[name]
    ids = T.tokenize(MIDI / name, dim=False)
    assert same_up_to_prefix_order(ids, ref["ids_no_dim"], ref["n_prefix"])


@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_variants_prompt_chunks_and_detokenize_match_official(name):
    g = golden(name.replace(".mid", ".json"))
    n = g["tokenize_default"]["n_prefix_tokens"]
    score = T.load_midi(MIDI / name)
    assert len(score.notes) == len(g["midi_dict"]["note_msgs"])
    assert [(m["start"], m["end"], m["pitch"], m["velocity"], m["channel"]) for m in g["midi_dict"]["note_msgs"]] \
        == score.notes
    ref = json.loads((GOLDEN / "tokens.json").read_text())[name]
    if ref["ids_no_dim"] != ref["ids_no_dim_official"]:
        # these goldens carry the official multi-tempo bug (SPEC §A.3); only detokenize applies
        check_detokenize(g)
        return
    assert same_up_to_prefix_order(T.tokenize(score, dim=False, keep_silence=True),
                                   g["tokenize_no_dim_keep_silence"]["ids"], n)
    assert same_up_to_prefix_order(T.tokenize(score, dim=False, eos=False), g["tokenize_no_dim_no_eos_ids"], n)

    # <D>: removing it gives the no-dim sequence, and it sits where the official rule puts it
    for rng in (None, random.Random(0), random.Random(1)):
        ids = T.tokenize(score, rng=rng)
        nodim = T.tokenize(score, dim=False)
        body = len(nodim) - n - 2
        if body > 150:
            d = ids.index(T.DIM_ID)
            assert same_up_to_prefix_order(ids[:d] + ids[d + 1:], nodim, n)
            from_end = len(ids) - 1 - d  # tokens after <D>, counting <E>
            assert 90 <= from_end - 1 <= 113
            assert T.TOKEN_CLASS[ids[d + 1]] in (T.NOTE, T.DRUM) or ids[d + 1] == T.SEG_ID
        else:
            assert T.DIM_ID not in ids

    # the official default places <D> at -100+k; ours with rng=None is k=0, with an rng k is drawn
    ref = g["tokenize_default"]
    if ref["dim_tok_index"] is not None and ref["dim_tok_index"] >= 0:
        ref_nodim = ref["ids"][:ref["dim_tok_index"]] + ref["ids"][ref["dim_tok_index"] + 1:]
        assert same_up_to_prefix_order(ref_nodim, T.tokenize(score, dim=False), n)

    p = g["inference_prompt_15s"]["ids"]
    assert same_up_to_prefix_order(T.prompt(score, 15), p, n if len(p) > 2 else 0)

    chunks = T.note_chunks(score, 300)
    assert len(chunks) == len(g["embedding_chunks_300_ids"])
    for mine, ref_chunk in zip(chunks, g["embedding_chunks_300_ids"]):
        assert same_up_to_prefix_order(mine, ref_chunk, n)
    check_detokenize(g)


def check_detokenize(g):
    ref = g["tokenize_default"]
    # detokenize the official default tokens: same notes (ms), same channel programs
    det = g["detokenize_default"]
    notes, programs = T.detokenize_notes(ref["ids"])
    assert {int(k): v for k, v in det["channel_programs"].items()} == programs
    in_vocab = lambda m: m["channel"] != 9 or 35 <= m["pitch"] <= 81  # other drums are <U> in ids
    ref_notes = [(m["start"], m["end"], m["pitch"], m["velocity"], m["channel"]) for m in det["note_msgs"] if in_vocab(m)]
    assert sorted(notes) == sorted(ref_notes)
    # and the written file reparses to the official to_midi notes
    mid = T.detokenize(ref["ids"])
    buf = io.BytesIO()
    mid.save(file=buf)
    back = T.load_midi(buf.getvalue())
    ref_back = [(m["start"], m["end"], m["pitch"], m["velocity"], m["channel"]) for m in g["to_midi_reparsed_notes"]
                if in_vocab(m)]
    assert sorted(back.notes) == sorted(ref_back)


@needs_shared
def test_multitempo_timing_is_correct_not_official_bug():
    # SPEC §A.3: 300 ticks at 600000 µs/beat, tpb 480 lasts 375 ms (the official code says 570)
    score = T.load_midi(MIDI / "synthetic_multitempo.mid")
    assert score.tempo_map.duration_ms(0, 0) == 0
    tm = T.TempoMap([(0, 500000), (480, 600000)], 480)
    assert tm.duration_ms(960, 1260) == 375
    assert tm.duration_ms(0, 960) == 500 + 600
    assert tm.onsets_ms(0, [0, 480, 960, 1260]) == [0, 500, 1100, 1475]


@needs_shared
def test_arabesque_last_onset():
    # aria-utils test_tick_to_ms: the last note onset of arabesque is 220140 ms
    score = T.load_midi(MIDI / "arabesque.mid")
    assert score.tick_to_ms(score.notes[-1][0]) == 220140


@needs_shared
def test_augmentations_match_official():
    a = golden("augmentation.json")
    inputs = {k: v["ids"] for k, v in a["inputs"].items()}
    for case in a["cases"]:
        src = np.array(inputs[case["input"]])
        (param,) = case["params"].values()
        fn = {"pitch": lambda p: T.pitch_shift(p, param),
              "velocity": lambda p: T.velocity_shift(p, param),
              "tempo_mixup_false": lambda p: T.tempo_scale(p, param)}[case["fn"]]
        out = T.per_piece(src, fn)
        assert len(out) == len(src)
        assert out.tolist() == case["ids"], (case["input"], case["fn"], case["params"])


# -- properties on MIDI generated here -----------------------------------------------------

def random_midi(seed, n_notes=120, tempo_changes=True, drums=True, pedal=True, tpb=None):
    """A type-1 file with overlapping notes, pedals, tempo changes, two channels and drums."""
    rng = random.Random(seed)
    tpb = tpb or rng.choice([96, 120, 384, 480, 960])
    mid = mido.MidiFile(type=1, ticks_per_beat=tpb)
    meta = mido.MidiTrack()
    t = 0
    meta.append(mido.MetaMessage("set_tempo", tempo=rng.randint(300000, 900000), time=0))
    if tempo_changes:
        for _ in range(rng.randint(1, 6)):
            d = rng.randint(1, 8 * tpb)
            meta.append(mido.MetaMessage("set_tempo", tempo=rng.randint(300000, 900000), time=d))
    mid.tracks.append(meta)
    for ch in [0, 1] + ([9] if drums else []):
        events = []
        if ch == 1:
            events.append((0, mido.Message("program_change", channel=1, program=rng.choice([0, 4, 33, 40]))))
        for _ in range(n_notes // 2 if ch != 9 else 20):
            start = rng.randint(0, 60 * tpb)
            dur = rng.randint(1, 6 * tpb)
            pitch = rng.randint(21, 108) if ch != 9 else rng.randint(35, 81)
            events.append((start, mido.Message("note_on", channel=ch, note=pitch, velocity=rng.randint(1, 127))))
            events.append((start + dur, mido.Message("note_off", channel=ch, note=pitch, velocity=0)))
        if pedal and ch != 9:
            for _ in range(6):
                s = rng.randint(0, 60 * tpb)
                events.append((s, mido.Message("control_change", channel=ch, control=64, value=127)))
                events.append((s + rng.randint(1, 4 * tpb), mido.Message("control_change", channel=ch, control=64, value=0)))
        events.sort(key=lambda e: e[0])
        track, now = mido.MidiTrack(), 0
        for tick, msg in events:
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    return mid


def to_bytes(mid):
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


@pytest.mark.parametrize("seed", range(12))
def test_round_trip_within_quantization(seed):
    """tokenize -> detokenize -> tokenize is a fixed point, and onsets survive within 10 ms."""
    src = T.load_midi(to_bytes(random_midi(seed)))
    ids = T.tokenize(src, dim=False, keep_silence=True)
    notes, _ = T.detokenize_notes(ids)
    assert len(notes) == len(src.notes)
    ms = sorted(round(src.tick_to_ms(n[0]), -1) for n in src.notes)
    assert max(abs(a - b[0]) for a, b in zip(ms, sorted(notes))) <= 10
    mid = T.detokenize(ids)
    again = T.tokenize(to_bytes(mid), dim=False, keep_silence=True)
    # re-tokenized ids equal up to order among notes sharing an onset, and overlap trimming
    assert len(again) <= len(ids)
    assert sorted(T.detokenize_notes(again)[0]) == sorted(T.detokenize_notes(T.tokenize(T.load_midi(to_bytes(mid)), dim=False, keep_silence=True))[0])
    on_a = sorted((n[0], n[2], n[3], n[4]) for n in T.detokenize_notes(again)[0])
    on_b = sorted((n[0], n[2], n[3], n[4]) for n in notes if n[1] > n[0])
    assert len(on_a) <= len(on_b) and set(on_a) <= set(on_b)


@pytest.mark.parametrize("seed", range(6))
def test_simple_piano_round_trip_is_exact(seed):
    """Without overlaps or pedal, at 1 tick = 1 ms on the 10 ms grid, ids survive a round trip exactly."""
    rng = random.Random(seed)
    mid = mido.MidiFile(type=0, ticks_per_beat=500)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000, time=0)])
    events, t = [], 0
    for _ in range(200):
        t += rng.choice([0, 10, 20, 150, 480, 6020])
        events.append((t, 1, rng.randint(21, 108), rng.choice(range(10, 121, 10)), rng.randint(1, 500) * 10))
    seen, msgs = set(), []
    for start, _, pitch, vel, dur in events:
        if (start, pitch) in seen or any(p == pitch and s < start + dur and start < s + d for s, _, p, _, d in events if (s, p) != (start, pitch)):
            continue
        seen.add((start, pitch))
        msgs += [(start, 1, mido.Message("note_on", note=pitch, velocity=vel)), (start + dur, 0, mido.Message("note_off", note=pitch))]
    msgs.sort(key=lambda m: (m[0], m[1]))
    now = 0
    for tick, _, m in msgs:
        track.append(m.copy(time=tick - now))
        now = tick
    mid.tracks.append(track)
    ids = T.tokenize(to_bytes(mid), dim=False)
    back = T.tokenize(to_bytes(T.detokenize(ids)), dim=False)
    assert sorted(T.detokenize_notes(back)[0]) == sorted(T.detokenize_notes(ids)[0])


@pytest.mark.parametrize("seed", range(8))
def test_augmentations_are_well_formed_and_invertible(seed):
    ids = T.tokenize(T.load_midi(to_bytes(random_midi(seed, drums=False))), dim=True)
    arr = np.array(ids)
    # pitch and velocity: length kept; shifting back restores the sequence (while in range)
    assert T.pitch_shift(T.pitch_shift(arr, 3), -3).tolist() == ids or T.UNK_ID in T.pitch_shift(arr, 3)
    assert (T.pitch_shift(T.pitch_shift(arr, 40), -40) != arr).sum() >= 0
    v = T.velocity_shift(arr, 1)
    notes = T._note_mask(arr)
    assert ((v[notes] - T.NOTE_START) % 13 >= 1).all() and ((v[notes] - T.NOTE_START) % 13 <= 12).all()
    assert (v[~notes] == arr[~notes]).all()
    # tempo: every event keeps its token, onsets scale within 10 ms, grammar stays valid
    for f in (0.8, 1.0, 1.2):
        out = T.tempo_scale(ids, f)
        a, b = T.detokenize_notes(ids)[0], T.detokenize_notes(out)[0]
        assert len(a) == len(b)
        sa = sorted(a, key=lambda n: (n[0], n[2]))
        sb = sorted(b, key=lambda n: (n[0], n[2]))
        assert all(abs(y[0] - round(x[0] * f, -1)) <= 10 for x, y in zip(sa, sb))
    # full augmentation: seeded, fixed length, valid ids, every event complete
    out1 = T.augment(arr, random.Random(seed))
    out2 = T.augment(arr, random.Random(seed))
    assert out1.tolist() == out2.tolist() and len(out1) == len(arr)
    assert ((out1 >= 0) & (out1 < T.VOCAB_SIZE)).all()
    cls = T.TOKEN_CLASS[out1]
    for k in np.flatnonzero(cls == T.NOTE):
        if k + 2 < len(out1):
            assert cls[k + 1] == T.ONSET and cls[k + 2] == T.DUR


def test_augment_draws_per_piece():
    a = T.tokenize(T.load_midi(to_bytes(random_midi(1, drums=False))), dim=False)
    packed = np.array((a + a)[:len(a) + 200])
    out = T.augment(packed, random.Random(3), tempo=0, velocity=0)
    first = out[:len(a)][T._note_mask(np.array(a))] - np.array(a)[T._note_mask(np.array(a))]
    assert len(out) == len(packed) and len(set(first.tolist())) == 1  # one shift per piece


def test_onsets_never_go_back_within_a_segment():
    ids = T.tokenize(T.load_midi(to_bytes(random_midi(5))), dim=False)
    last = -1
    for i in ids:
        if i == T.SEG_ID:
            last = -1
        elif T.TOKEN_CLASS[i] == T.ONSET:
            assert i >= last
            last = i


def test_slices():
    score = T.load_midi(to_bytes(random_midi(2, n_notes=400)))
    rng = random.Random(0)
    for _ in range(20):
        s = T.random_slice(score, rng)
        assert 1 <= len(s.notes) <= 650
        assert T.tokenize(s)[-1] == T.EOS_ID
    chunks = T.note_chunks(score, 100)
    assert len(chunks) == -(-len(score.notes) // 100)
    assert all(c[-1] == T.EOS_ID and T.DIM_ID not in c for c in chunks)


def test_prompt_cut_and_empty_prompt():
    score = T.load_midi(to_bytes(random_midi(4)))
    p = T.prompt(score, 5)
    assert p[-1] != T.EOS_ID and T.DIM_ID not in p
    notes, _ = T.detokenize_notes(p)
    assert notes and max(n[0] for n in notes) <= 5000
    assert T.prompt(score, -1) == [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]


def test_token_classes_and_strings():
    assert T.TOKEN_CLASS[T.note_id("piano", 60, 80)] == T.NOTE
    assert T.TOKEN_CLASS[T.onset_id(4990)] == T.ONSET and T.TOKEN_CLASS[T.dur_id(5000)] == T.DUR
    assert T.token_str(T.note_id("piano", 60, 80)) == "piano:60:80"
    assert T.decode(T.encode(["<S>", ("piano", 60, 80), ["onset", 10], ("drum", 30)])) == \
        ["<S>", ("piano", 60, 80), ("onset", 10), "<U>"]


def test_metadata_prefix_and_rng_prefix_order():
    score = T.load_midi(to_bytes(random_midi(3)))
    ids = T.tokenize(score, metadata={"composer": "chopin", "genre": "classical", "form": "unknown"})
    pre = ids[:ids.index(T.BOS_ID)]
    assert T.TOKEN_TO_ID[("prefix", "composer", "chopin")] in pre
    assert T.TOKEN_TO_ID[("prefix", "genre", "classical")] in pre
    assert pre == sorted(pre)
    shuffled = T.tokenize(score, metadata={"composer": "chopin"}, rng=random.Random(7))
    assert sorted(shuffled[:len(pre) - 1]) == sorted(x for x in pre if x != T.TOKEN_TO_ID[("prefix", "genre", "classical")])


def test_ignored_instruments_and_drums_only():
    mid = mido.MidiFile(type=0, ticks_per_beat=480)
    tr = mido.MidiTrack([mido.Message("program_change", channel=0, program=13),  # chromatic: ignored
                         mido.Message("note_on", note=60, velocity=80, channel=0),
                         mido.Message("note_off", note=60, channel=0, time=480)])
    mid.tracks.append(tr)
    with pytest.raises(T.TokenizerError, match="ignored instruments"):
        T.tokenize(to_bytes(mid))
    mid2 = mido.MidiFile(type=0, ticks_per_beat=480)
    mid2.tracks.append(mido.MidiTrack([mido.Message("note_on", note=36, velocity=80, channel=9),
                                       mido.Message("note_off", note=36, channel=9, time=480),
                                       mido.Message("note_on", note=20, velocity=80, channel=9),
                                       mido.Message("note_off", note=20, channel=9, time=480)]))
    ids = T.tokenize(to_bytes(mid2))
    assert ids[:3] == sorted([T.INSTRUMENT_PREFIX_ID["piano"], T.INSTRUMENT_PREFIX_ID["drum"]]) + [T.BOS_ID]
    assert ids[3] == T.TOKEN_TO_ID[("drum", 36)] and ids[5] == T.UNK_ID  # pitch 20 is outside 35..81


# -- bad input -----------------------------------------------------------------------------

def bad_inputs(tmp_path):
    good = to_bytes(random_midi(0))
    empty_song = mido.MidiFile(type=1, ticks_per_beat=480)
    empty_song.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    files = {
        "missing.mid": None,
        "text.mid": b"hello, not midi",
        "empty.mid": b"",
        "truncated.mid": good[: len(good) // 2],
        "nonotes.mid": to_bytes(empty_song),
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return [tmp_path / n for n in files]


def test_bad_inputs_raise_one_clear_error(tmp_path):
    for path in bad_inputs(tmp_path):
        with pytest.raises(T.TokenizerError) as e:
            T.tokenize(path)
        msg = str(e.value)
        assert path.name in msg and "\n" not in msg


def test_cli_readable_json_and_errors(tmp_path):
    good = tmp_path / "good.mid"
    good.write_bytes(to_bytes(random_midi(0)))
    bad = bad_inputs(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *map(str, a)],
                                    capture_output=True, text=True, timeout=60)
    r = run(good)
    assert r.returncode == 0 and "<S>" in r.stdout and "piano:" in r.stdout
    r = run("--json", "--no-dim", good, *bad, good)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["file"] for d in lines] == [str(p) for p in [good, *bad, good]]
    assert lines[0]["ids"] == T.tokenize(good, dim=False) and lines[0]["ids"] == lines[-1]["ids"]
    assert all("error" in d for d in lines[1:-1])
    r = run("--json", good)
    assert r.returncode == 0 and T.DIM_ID in json.loads(r.stdout)["ids"]
