"""tokenizer.py's pedal mode (official include_pedal, the demo checkpoint's vocabulary): official ids
and detokenization (goldens in ../shared), held-out performances, twins on MIDI made here, CLI."""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import tokenizer as T  # noqa: E402
from test_tokenizer import (FILES, GOLDEN, MIDI, ROOT, SHARED, Draws, grid_notes, midi_bytes,  # noqa: E402
                            needs_shared, same_up_to_prefix_order, stretched, to_bytes)

PIANO = T.INSTRUMENT_PREFIX_ID["piano"]
HELD_OUT = [SHARED.parent / "data" / "maestro_v2" / p for p in (  # small MAESTRO files, dense pedalling
    "2011/MIDI-Unprocessed_22_R1_2011_MID--AUDIO_R1-D8_12_Track12_wav.midi",
    "2011/MIDI-Unprocessed_12_R3_2011_MID--AUDIO_R3-D4_08_Track08_wav.midi",
    "2018/MIDI-Unprocessed_Recital16_MID--AUDIO_16_R1_2018_wav--3.midi")]


def strip_pedal(ids):
    """ids without their pedal events (token + onset) and the <T>s that only led to pedal events."""
    out, k = [], 0
    while k < len(ids):
        if T.TOKEN_CLASS[ids[k]] == T.PEDAL:
            k += 2
        else:
            out.append(ids[k])
            k += 1
    eos = out[-1] == T.EOS_ID
    body = out[:len(out) - eos]
    while body[-1] == T.SEG_ID:
        body.pop()
    return body + [T.EOS_ID] * eos


def pedal_at(changes, t):
    """The pedal (1 down, 0 up) after the changes [(ms, on)] up to time t."""
    return ([on for when, on in changes if when <= t] or [0])[-1]


@needs_shared
@pytest.mark.parametrize("name", FILES)
def test_pedal_mode_matches_official(name):
    ref = json.loads((GOLDEN / "pedal" / "tokens.json").read_text())[name]
    if "error" in ref:  # the official tokenizer accepts piano only in this mode
        with pytest.raises(T.TokenizerError, match="piano only") as e:
            T.tokenize(MIDI / name, dim=False, pedal=True)
        assert name in str(e.value) and "\n" not in str(e.value)
        return
    ids = T.tokenize(MIDI / name, dim=False, pedal=True)
    assert same_up_to_prefix_order(ids, ref["ids"], ref["n_prefix"])
    assert sum(T.TOKEN_CLASS[i] == T.PEDAL for i in ids) == ref["n_pedal"] and T.is_pedal(ids) == (ref["n_pedal"] > 0)
    # detokenize: the official notes (durations as tokenized) and pedal changes, to the ms
    notes, programs, pedals = T.detokenize_notes(ref["ids"], pedals=True)
    assert sorted((p, s, e, v) for s, e, p, v, _ in notes) == sorted(map(tuple, ref["detok_notes"]))
    assert [(t, 0, on) for t, on in pedals] == list(map(tuple, ref["detok_pedal"])) and programs == {0: 0}
    back = T.load_midi(to_bytes(T.detokenize(ref["ids"])))  # written as CC64 on channel 0, 1 tick = 1 ms
    assert back.ticks_per_beat == ref["detok_ticks_per_beat"] == 500
    assert back.pedals == list(map(tuple, ref["detok_pedal"]))
    # the default mode's ids are these without the pedal events (same origin: keep the silence)
    assert strip_pedal(T.tokenize(MIDI / name, dim=False, keep_silence=True, pedal=True)) \
        == T.tokenize(MIDI / name, dim=False, keep_silence=True)


@pytest.mark.skipif(not all(p.is_file() for p in HELD_OUT), reason="../shared/data/maestro_v2 not present")
@pytest.mark.parametrize("path", HELD_OUT, ids=lambda p: p.stem[-24:])
def test_pedal_mode_on_held_out_performances(path):
    score = T.load_midi(path)
    ids = T.tokenize(score, dim=False, keep_silence=True, pedal=True)
    # every pedal message at its time on the onset grid, the rest exactly the default mode's ids
    assert strip_pedal(ids) == T.tokenize(score, dim=False, keep_silence=True)
    ms = [score.duration_ms(0, tick) for tick, _, _ in score.pedals]
    notes, _, pedals = T.detokenize_notes(ids, pedals=True)
    assert len(pedals) > len(notes) / 2
    assert pedals == [(t - t % 5000 + T.ONSET_Q[t % 5000], on) for t, (_, _, on) in zip(ms, score.pedals)]
    # ids -> MIDI -> ids: the pedal and every note onset survive; once on the grid, a fixed point
    # (up to the order of events sharing an onset; re-struck notes that MIDI cannot overlap are cut)
    again = T.tokenize(to_bytes(T.detokenize(ids)), dim=False, keep_silence=True, pedal=True)
    notes2, _, pedals2 = T.detokenize_notes(again, pedals=True)
    assert pedals2 == pedals and sorted(n[:1] + n[2:] for n in notes2) == sorted(n[:1] + n[2:] for n in notes)
    third = T.tokenize(to_bytes(T.detokenize(again)), dim=False, keep_silence=True, pedal=True)
    assert sorted(third) == sorted(again) and T.detokenize_notes(third, pedals=True)[2] == pedals
    assert sorted(T.detokenize_notes(third)[0]) == sorted(notes2)


def test_pedal_tokens_by_construction():
    # 1 tick = 1 ms. A press at 100 ms (after the note there), its release at 2230 ms holding both
    # notes; a new segment; a last press never released (it ends at the last note's end: no hold)
    notes = [(0, 400, 60, 80, 0), (100, 300, 64, 70, 0), (5300, 5400, 67, 60, 0)]
    data = midi_bytes(notes, pedals=[(100, 0, 127), (2230, 0, 0), (5350, 0, 100)])
    ids = T.tokenize(data, dim=False, pedal=True)
    on, dur = T.onset_id, T.dur_id
    assert ids == [PIANO, T.BOS_ID, T.note_id("piano", 60, 80), on(0), dur(2230),
                   T.note_id("piano", 64, 70), on(100), dur(2130), T.PED_ON_ID, on(100), T.PED_OFF_ID, on(2230),
                   T.SEG_ID, T.note_id("piano", 67, 60), on(300), dur(100), T.PED_ON_ID, on(350), T.EOS_ID]
    assert strip_pedal(ids) == T.tokenize(data, dim=False)  # durations hold the pedal in both modes
    # written back: CC64 127/0 on channel 0, after the notes at its tick; reparsed, the same ids
    mid = T.detokenize(ids)
    msgs, now = [], 0
    for m in mid.tracks[0]:
        now += m.time
        msgs.append((now, m.type, getattr(m, "value", None)))
    cc = [(t, v) for t, kind, v in msgs if kind == "control_change"]
    assert cc == [(100, 127), (2230, 0), (5350, 127)] and msgs.index((100, "control_change", 127)) == len(
        [x for x in msgs if x[0] <= 100]) - 1
    assert T.tokenize(to_bytes(mid), dim=False, pedal=True) == ids
    # a press before the first note sets the origin (as officially); without keep_silence the note is at 300
    early = midi_bytes([(500, 700, 60, 80, 0)], pedals=[(200, 0, 127), (900, 0, 0)])
    early = T.tokenize(early, dim=False, pedal=True)
    assert early == [PIANO, T.BOS_ID, T.PED_ON_ID, on(0), T.note_id("piano", 60, 80), on(300), dur(400),
                     T.PED_OFF_ID, on(700), T.EOS_ID]
    # official quirk: a pedal on the drum channel takes the drum path, a drum without a pitch: <U>
    drum_ch = T.tokenize(midi_bytes([(0, 100, 60, 80, 0)], pedals=[(50, 9, 127)]), dim=False, pedal=True)
    assert drum_ch[-3:] == [T.UNK_ID, on(50), T.EOS_ID]
    # the default vocabulary and its hash are unchanged; pedal tokens are ids 17727/17728
    assert T.VOCAB_HASH == "0d058004fba603c7" != T.PEDAL_VOCAB_HASH and T.VOCAB_SIZE == 17727
    assert T.is_pedal(ids) and not T.is_pedal(T.tokenize(data)) and not T.is_pedal([])
    assert T.token_str(T.PED_ON_ID) == "<PED_ON>" and T.token_str(T.PEDAL_VOCAB_SIZE) == "<U>"


def test_pedal_mode_refuses_other_instruments(tmp_path):
    path = tmp_path / "duet.mid"
    path.write_bytes(midi_bytes([(0, 100, 60, 80, 0), (0, 100, 48, 80, 1)], programs=[(1, 24)], pedals=[(0, 0, 127)]))
    with pytest.raises(T.TokenizerError, match="piano only") as e:
        T.tokenize(path, pedal=True)
    assert str(e.value) == f"{path}: pedal mode takes piano only, this file has guitar"
    assert not T.is_pedal(T.tokenize(path))  # the default mode takes it, its pedal in durations only


def pedalled_piece(seed=7):
    """grid_notes on one channel with a press and release every 700 ms, 1 tick = 1 ms."""
    notes = grid_notes(seed, 60, channels=(0,))
    return notes, [(t, 0, 127 if k % 2 == 0 else 0) for k, t in enumerate(range(50, notes[-1][0], 700))]


def test_augment_in_pedal_mode_moves_the_pedal_with_time():
    notes, pedals = pedalled_piece()
    ids = T.tokenize(midi_bytes(notes, pedals=pedals), pedal=True, rng=random.Random(0))
    src_notes, _, src_pedals = T.detokenize_notes(ids, pedals=True)
    assert len(src_pedals) == len(pedals) > 10
    q = lambda x: round(x / 10) * 10
    for seed in range(3):
        rng = Draws(seed)
        out = T.augment(np.array(ids), rng, fit=False)
        f, k, v = rng.log
        got_notes, _, got_pedals = T.detokenize_notes(out, pedals=True)
        assert sorted(got_notes) == stretched(src_notes, f, k, v)  # pitch and velocity leave pedal tokens alone
        assert sorted(got_pedals) == sorted((q(t * f), on) for t, on in src_pedals)
        assert out[-1] == T.EOS_ID and out.tolist().count(T.DIM_ID) == 1
    packed = T.augment(np.array(ids + ids), random.Random(0))  # per piece, fit to the input length
    assert len(packed) == 2 * len(ids) and T.is_pedal(packed) and T.EOS_ID in packed.tolist()


def test_prompt_in_pedal_mode_releases_a_pedal_held_at_the_cut():
    notes = [(250 * i, 250 * i + 100, 60 + i % 12, 80, 0) for i in range(30)]
    pedals = [(50, 0, 127), (300, 0, 0), (2900, 0, 127), (3600, 0, 0)]
    score = T.load_midi(midi_bytes(notes, pedals=pedals))
    for seconds, want in ((3, [(50, 1), (300, 0)]),  # pressed at 2.9 s, still held at the 3 s cut: dropped
                          (4, [(50, 1), (300, 0), (2900, 1), (3600, 0)])):
        p = T.prompt(score, seconds, pedal=True)
        assert T.EOS_ID not in p and T.detokenize_notes(p, pedals=True)[2] == want
        assert strip_pedal(p) == T.prompt(score, seconds) and not T.is_pedal(T.prompt(score, seconds))


def test_note_chunks_and_slices_in_pedal_mode_carry_their_own_pedal():
    notes = [(200 * i, 200 * i + 150, 60 + i % 12, 80, 0) for i in range(40)]
    pedals = [(1000, 0, 127), (2500, 0, 0), (3900, 0, 127), (6300, 0, 0)]  # the second press spans the chunks
    score = T.load_midi(midi_bytes(notes, pedals=pedals))
    a, b = T.note_chunks(score, 20, pedal=True)
    # chunk 1 (0..3950 ms): its changes, then the release of the press held at its last note-off
    assert T.detokenize_notes(a, pedals=True)[2] == [(1000, 1), (2500, 0), (3900, 1), (6300, 0)]
    # chunk 2 (from 4000 ms, its time 0): pressed at its first note, since the pedal is down there
    assert T.detokenize_notes(b, pedals=True)[2] == [(0, 1), (2300, 0)]
    assert [strip_pedal(c) for c in (a, b)] == T.note_chunks(score, 20)  # notes and durations unchanged
    # random slices: the pedal is where the piece has it at every note and at the last note-off
    notes, pedals = pedalled_piece(8)
    score = T.load_midi(midi_bytes(notes, pedals=pedals))
    piece = [(t, on) for t, _, on in score.pedals]
    rng = random.Random(0)
    for _ in range(20):
        s = T.random_slice(score, rng, 5, 15)
        ids = T.tokenize(s, pedal=True)
        assert strip_pedal(ids) == T.tokenize(s)
        lo = s.notes[0][0]
        own = [(t + lo, on) for t, on in T.detokenize_notes(ids, pedals=True)[2]]
        times = [n[0] for n in s.notes] + [max(n[1] for n in s.notes)]
        assert [pedal_at(own, t) for t in times] == [pedal_at(piece, t) for t in times]
        assert not own or own[-1][1] == 0 and own[-1][0] <= max(t for t, _ in piece)


def test_cli_pedal(tmp_path):
    notes, pedals = pedalled_piece()
    good, duet = tmp_path / "solo.mid", tmp_path / "duet.mid"
    good.write_bytes(midi_bytes(notes, pedals=pedals))
    duet.write_bytes(midi_bytes(notes + [(0, 100, 30, 80, 1)], programs=[(1, 33)], pedals=pedals))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *map(str, a)],
                                    capture_output=True, text=True, timeout=60)
    r = run("--json", "--no-dim", "--pedal", good, duet)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    ok, refused = [json.loads(line) for line in r.stdout.splitlines()]
    assert ok["ids"] == T.tokenize(good, dim=False, pedal=True) and T.PED_ON_ID in ok["ids"]
    assert refused == {"file": str(duet), "error": f"{duet}: pedal mode takes piano only, this file has bass"}
    r = run("--pedal", good)
    assert r.returncode == 0 and "\n<PED_ON> onset:" in r.stdout and "\n<PED_OFF> onset:" in r.stdout
