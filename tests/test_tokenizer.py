"""tokenizer.py: official ids (goldens in ../shared), round trips, augmentation, bad input, CLI.
"Official": EleutherAI/aria-utils @ e122d03 (paths ariautils/...) and EleutherAI/aria @ b0486c8."""
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
    assert [list(t) if isinstance(t, tuple) else t for t in T.VOCAB[:T.VOCAB_SIZE]] == v["tokens"]
    # pedal mode appends two tokens (official AbsTokenizer.__init__, include_pedal; aria/demo/config.json)
    assert T.VOCAB[T.VOCAB_SIZE:] == ["<PED_ON>", "<PED_OFF>"] and (T.PED_ON_ID, T.PED_OFF_ID) == (17727, 17728)
    assert T.PEDAL_VOCAB_SIZE == len(T.TOKEN_CLASS) == 17729
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
        # these goldens carry the official multi-tempo bug (midi.py get_duration_ms): detokenize only
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


def test_multitempo_timing_is_correct_not_official_bug():
    # 300 ticks at 600000 µs/beat, tpb 480 last 375 ms; the official midi.py get_duration_ms says 570
    score = T.Score(480, [], [(0, 500000), (480, 600000)], [], [])
    assert score.duration_ms(960, 1260) == 375
    assert score.duration_ms(0, 960) == 500 + 600
    assert score.duration_ms(0, 0) == 0 and score.duration_ms(-480, 0) == 500  # the first tempo covers ticks before it
    assert score.onsets_ms(0, [0, 480, 960, 1260]) == [0, 500, 1100, 1475]
    assert score.onsets_ms(480, [480, 960, 1260]) == [0, 600, 975]


@needs_shared
def test_arabesque_last_onset():
    # aria-utils test_tick_to_ms: the last note onset of arabesque is 220140 ms
    score = T.load_midi(MIDI / "arabesque.mid")
    assert score.duration_ms(0, score.notes[-1][0]) == 220140


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
    ms = sorted(round(src.duration_ms(0, n[0]), -1) for n in src.notes)
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
    notes = T.TOKEN_CLASS[arr] == T.NOTE
    # pitch (21..108 here): +3 and back restores the ids; past 127 a note becomes <U>, its onset and dur stay
    assert T.pitch_shift(T.pitch_shift(arr, 3), -3).tolist() == ids
    up = T.pitch_shift(arr, 40)
    pitch = (arr[notes] - T.NOTE_START) % T.NOTES_PER_INSTRUMENT // 13
    assert ((up[notes] == T.UNK_ID) == (pitch + 40 > 127)).all() and (up[~notes] == arr[~notes]).all()
    # velocity: one bin up, clamped at 120
    v = T.velocity_shift(arr, 1)
    assert ((v[notes] - T.NOTE_START) % 13 == np.minimum((arr[notes] - T.NOTE_START) % 13 + 1, 12)).all()
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


def test_onsets_never_go_back_within_a_segment():
    ids = T.tokenize(T.load_midi(to_bytes(random_midi(5))), dim=False)
    last = -1
    for i in ids:
        if i == T.SEG_ID:
            last = -1
        elif T.TOKEN_CLASS[i] == T.ONSET:
            assert i >= last
            last = i


# -- effects: each option changes the output by what it promises (and the twins of the ../shared checks)

def midi_bytes(notes, tempos=((0, 500000),), programs=(), pedals=()):
    """notes (start, end, pitch, velocity, channel) in ticks, programs (channel, program), pedals
    (tick, channel, value) -> a type-0 file at 500 ticks per beat: 1 tick = 1 ms at the default tempo."""
    events = [(t, 0, mido.MetaMessage("set_tempo", tempo=tempo)) for t, tempo in tempos]
    events += [(0, 0, mido.Message("program_change", channel=ch, program=p)) for ch, p in programs]
    events += [(t, 2, mido.Message("control_change", channel=ch, control=64, value=v)) for t, ch, v in pedals]
    for start, end, pitch, vel, ch in notes:
        events += [(start, 3, mido.Message("note_on", channel=ch, note=pitch, velocity=vel)),
                   (end, 1, mido.Message("note_off", channel=ch, note=pitch))]
    events.sort(key=lambda e: (e[0], e[1]))
    mid, now = mido.MidiFile(type=0, ticks_per_beat=500), 0
    mid.tracks.append(mido.MidiTrack())
    for tick, _, msg in events:
        mid.tracks[0].append(msg.copy(time=tick - now))
        now = tick
    return to_bytes(mid)


def grid_notes(seed, n, channels=(0, 1)):
    """About n notes on the 10 ms grid, some in chords, pitches 40..80 (drums too), velocities 30..100
    on the bins, durations 10..1500 ms, never overlapping on a pitch: exactly representable as tokens."""
    rng = random.Random(seed)
    notes, busy, t = [], {}, 0
    for _ in range(n):
        t += rng.choice([0, 100, 250, 400, 1200])
        end, pitch, ch = t + rng.randint(1, 150) * 10, rng.randint(40, 80), rng.choice(channels)
        if busy.get((pitch, ch), -1) <= t:
            busy[(pitch, ch)] = end
            notes.append((t, end, pitch, rng.randint(3, 10) * 10, ch))
    return notes


def stretched(notes, f, k=0, v=0):
    """What augment promises for notes in ms (paper §3.2; official AbsTokenizer.export_data_aug):
    onsets and durations x f on the 10 ms grid (durations within 10..5000), pitch + k semitones,
    velocity + v bins of 10."""
    q = lambda x: round(x / 10) * 10
    return sorted((q(s * f), q(s * f) + min(max(q((e - s) * f), 10), 5000), p + k, vel + 10 * v, ch)
                  for s, e, p, vel, ch in notes)


class Draws(random.Random):
    """A random.Random that records augment's draws: the tempo factor, then the pitch and velocity shifts."""
    def __init__(self, seed):
        super().__init__(seed)
        self.log = []

    def uniform(self, a, b):
        self.log.append(super().uniform(a, b))
        return self.log[-1]

    def randint(self, a, b):
        self.log.append(super().randint(a, b))
        return self.log[-1]


def piece(seed, n=60):
    """One file's ids as prepare.py stores them (<D> and <E>), piano and guitar."""
    return T.tokenize(midi_bytes(grid_notes(seed, n), programs=[(1, 24)]), rng=random.Random(seed))


def test_augment_moves_notes_by_the_drawn_amounts():
    drawn = []
    for seed in range(3):
        a, b = piece(seed), piece(seed + 10)
        # fit=True, as pretrain/finetune_gen/finetune_cls call it: a packed window, one draw per piece
        packed = np.array(a + b + [T.PAD_ID] * 100)
        rng = Draws(seed)
        out = T.augment(packed, rng)
        assert len(out) == len(packed) and out.tolist() != packed.tolist()
        ends = np.flatnonzero(out == T.EOS_ID) + 1
        assert len(ends) == 2 and (out[ends[1]:] == T.PAD_ID).all()
        for src, got, draws in ((a, out[:ends[0]], rng.log[:3]), (b, out[ends[0]:ends[1]], rng.log[3:6])):
            assert sorted(T.detokenize_notes(got)[0]) == stretched(T.detokenize_notes(src)[0], *draws)
            assert got.tolist().count(T.DIM_ID) == 1
            drawn.append(draws)
        # fit=False, as the contrastive views use it: one piece, its stretched length kept
        rng = Draws(seed)
        one = T.augment(np.array(a), rng, fit=False)
        assert one[-1] == T.EOS_ID and sorted(T.detokenize_notes(one)[0]) == stretched(T.detokenize_notes(a)[0], *rng.log)
        assert T.augment(np.array(a), random.Random(seed)).tolist() == T.fit_length(one, len(a)).tolist()
    f, k, v = zip(*drawn)
    assert all(0.8 <= x <= 1.2 for x in f) and set(k) <= set(range(-5, 6)) and set(v) <= {-1, 0, 1}
    assert len(set(k)) > 2 and len(set(v)) > 1  # the draws above did move pitches and velocities


@pytest.mark.parametrize("fit", [True, False])
def test_augment_pitch_and_velocity_move_each_note_within_its_instrument(fit):
    a = np.array(piece(0))
    notes = T.TOKEN_CLASS[a] == T.NOTE
    for seed in range(4):
        rng = Draws(seed)
        out = T.augment(a, rng, tempo=0, fit=fit)
        k, v = rng.log
        assert (out[~notes] == a[~notes]).all()
        for x, y in zip(a[notes], out[notes]):
            inst, pitch, vel = T.VOCAB[x]
            assert T.VOCAB[y] == (inst, pitch + k, vel + 10 * v)


def test_tokenize_rng_shuffles_the_prefix_and_moves_dim():
    notes = grid_notes(3, 90, channels=(0, 1, 2, 9))
    score = T.load_midi(midi_bytes(notes, programs=[(1, 24), (2, 40)]))
    meta = {"composer": "chopin", "form": "waltz", "genre": "classical"}
    plain = T.tokenize(score, metadata=meta)
    n = plain.index(T.BOS_ID)
    body = T.tokenize(score, metadata=meta, dim=False)[n + 1:-1]
    # rng=None: deterministic, prefix in id order, <D> 100 tokens from the end, moved back to its event's start
    assert plain == T.tokenize(score, metadata=meta) and n == 7 and plain[:n] == sorted(plain[:n])
    cut = len(body) - 100
    while T.TOKEN_CLASS[body[cut]] in (T.ONSET, T.DUR):
        cut -= 1
    assert plain == plain[:n + 1] + body[:cut] + [T.DIM_ID] + body[cut:] + [T.EOS_ID]
    orders, offsets = set(), set()
    for seed in range(20):
        ids = T.tokenize(score, metadata=meta, rng=random.Random(seed))
        d = ids.index(T.DIM_ID)
        assert sorted(ids[:n]) == plain[:n] and ids[n + 1:d] + ids[d + 1:] == body + [T.EOS_ID]
        assert T.TOKEN_CLASS[ids[d + 1]] in (T.NOTE, T.DRUM) or ids[d + 1] == T.SEG_ID
        orders.add(tuple(ids[:n]))
        offsets.add(len(ids) - 2 - d)  # body tokens after <D>: -100 ± 10, up to 2 more to reach an event start
    assert len(orders) >= 10
    assert len(offsets) >= 8 and 90 <= min(offsets) < 100 < max(offsets) <= 112


def test_random_slice_bounds():
    score = T.load_midi(midi_bytes(grid_notes(4, 1000)))
    rng = random.Random(0)
    lengths = []
    for _ in range(300):
        s = T.random_slice(score, rng)
        i = score.notes.index(s.notes[0])
        assert s.notes == score.notes[i:i + len(s.notes)]  # contiguous
        lengths.append(len(s.notes))
    assert 100 <= min(lengths) < 150 and 600 < max(lengths) <= 650
    small = [len(T.random_slice(score, rng, 10, 20).notes) for _ in range(100)]
    assert min(small) == 10 and max(small) == 20
    short = score.with_notes(score.notes[:80])  # shorter than min_notes: the whole file
    assert T.random_slice(short, rng).notes == short.notes


def test_prompt_cuts_at_seconds_through_the_tempo_map():
    # 1 tick = 1 ms up to tick 2000, 2 ms after it: note i (tick 250 i) starts at 250 i ms up to i = 8, then 500 i - 2000
    notes = [(250 * i, 250 * i + 100, 60 + i % 12, 80, 0) for i in range(30)]
    notes[10] = (2500, 2950, 70, 80, 0)  # ends inside the second pedal press, which is held at 4 s: not held
    notes[11] = (2750, 4000, 71, 80, 0)  # starts at 3.5 s, lasts past the cut: kept whole (2.5 s)
    pedals = [(50, 0, 127), (300, 0, 0), (2900, 0, 127), (3600, 0, 0)]
    score = T.load_midi(midi_bytes(notes, tempos=[(0, 500000), (2000, 1000000)], pedals=pedals))
    ms = lambda tick: tick if tick <= 2000 else 2 * tick - 2000
    want = [(ms(s), ms(e), p, v, ch) for s, e, p, v, ch in notes[:13]]  # onsets <= 4000 ms: i <= 12
    want[0] = (0, 300, 60, 80, 0)  # held by the first pedal
    for seconds, count in ((4, 13), (3.9, 12)):
        p = T.prompt(score, seconds)
        assert T.EOS_ID not in p and T.DIM_ID not in p
        assert sorted(T.detokenize_notes(p)[0]) == sorted(want[:count])
    assert T.prompt(score, -1) == [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]


def test_note_chunks_are_consecutive_slices():
    score = T.load_midi(midi_bytes(grid_notes(5, 250, channels=(0,))))
    chunks = T.note_chunks(score, 100)
    assert len(chunks) == 3 and T.note_chunks(score, 100, max_len=64) == [c[:63] + [T.EOS_ID] for c in chunks]
    for i, c in enumerate(chunks):
        assert c[-1] == T.EOS_ID and T.DIM_ID not in c
        src = score.notes[100 * i:100 * (i + 1)]  # ticks are ms; each chunk starts at its first note
        assert sorted(T.detokenize_notes(c)[0]) == sorted((s - src[0][0], e - src[0][0], *n) for s, e, *n in src)


def test_midi_to_ids_to_midi_round_trip_is_exact():
    notes = [(s + 1000, e + 1000, p, v, ch) for s, e, p, v, ch in grid_notes(6, 150, channels=(0, 1, 9))]
    notes = [(s, s + 10, p, 60, ch) if ch == 9 else (s, e, p, v, ch) for s, e, p, v, ch in notes]  # drums: 10 ms at 60
    mid = T.detokenize(T.tokenize(midi_bytes(notes, programs=[(1, 24)]), keep_silence=True))
    back = T.load_midi(to_bytes(mid))
    assert sorted(back.notes) == sorted(notes)
    assert {ch: p for _, ch, p in back.programs} == {0: 0, 1: 24}


def test_token_classes_and_strings():
    assert T.TOKEN_CLASS[T.note_id("piano", 60, 80)] == T.NOTE
    assert T.TOKEN_CLASS[T.onset_id(4990)] == T.ONSET and T.TOKEN_CLASS[T.dur_id(5000)] == T.DUR
    assert T.token_str(T.note_id("piano", 60, 80)) == "piano:60:80" and T.token_str(T.SEG_ID) == "<T>"
    kind = {"prefix": T.PREFIX, "drum": T.DRUM, "onset": T.ONSET, "dur": T.DUR}
    want = [(T.PEDAL if tok.startswith("<PED") else T.SPECIAL) if isinstance(tok, str) else kind.get(tok[0], T.NOTE)
            for tok in T.VOCAB]
    assert T.TOKEN_CLASS.tolist() == want  # every id's class agrees with its token


def test_metadata_prefix():
    score = T.load_midi(to_bytes(random_midi(3)))
    ids = T.tokenize(score, metadata={"composer": "chopin", "genre": "classical", "form": "unknown"})
    pre = ids[:ids.index(T.BOS_ID)]
    assert T.TOKEN_TO_ID[("prefix", "composer", "chopin")] in pre
    assert T.TOKEN_TO_ID[("prefix", "genre", "classical")] in pre
    assert pre == sorted(pre) and not any(T.VOCAB[i][1] == "form" for i in pre)  # an unknown name adds nothing


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



def first_line_then_close(cmd, **kw):
    """Run cmd with stdout piped, read one line and close the pipe (what `| head -1` does);
    -> (first line, exit code, stderr)."""
    p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    line = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    return line, p.wait(timeout=120), err


def test_cli_reader_that_leaves_early_is_no_traceback(tmp_path):
    good = tmp_path / "good.mid"
    good.write_bytes(to_bytes(random_midi(0)))
    line, code, err = first_line_then_close([sys.executable, str(ROOT / "tokenizer.py"), "--json", *[good] * 200])
    assert json.loads(line)["file"] == str(good)
    assert code == 1 and err == ""  # nothing on stderr: no traceback, no "Exception ignored" at exit
