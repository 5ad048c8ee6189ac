"""
Aria's MIDI tokenizer: MIDI (via mido) <-> token ids, token-for-token compatible
with the official `ariautils.tokenizer.AbsTokenizer` used to train the released
checkpoints (paper §3.1; exact rules in SPEC §A).

A note is three tokens, (instrument, pitch, velocity) (onset) (duration); a drum hit
is two, (drum, pitch) (onset). Onsets are absolute within 5000 ms segments on a
10 ms grid and every segment boundary is marked by <T>. The sustain pedal is
folded into note durations. A sequence is `prefix <S> body [<E>]`, and the body may
carry <D> about 100 tokens before its end (the generative finetune's ending cue).

    python tokenizer.py song.mid            # readable tokens
    python tokenizer.py --json a.mid b.mid  # one JSON line per file: ids or error

This file must not import torch: data preparation runs it in many worker
processes, and it is much faster than the official code because it parses once
(no deep copies) and looks tempo and pedal changes up by bisection instead of
scanning them per note.
"""
import bisect
import hashlib
import json
import os
import random
import sys

import mido
import numpy as np

# -----------------------------------------------------------------------------
# Configuration (SPEC §A.1, the official `tokenizer.abs` config)

TIME_STEP_MS = 10        # onset/duration grid (paper §3.1)
SEGMENT_MS = 5000        # onsets are relative to 5000 ms segments marked by <T>
MAX_DUR_MS = 5000
VELOCITY_STEP = 10       # 12 reachable bins, 10..120 (SPEC §G.1)
DRUM_VELOCITY = 60       # only used when writing MIDI
DRUM_CHANNEL = 9
DEFAULT_TEMPO = 500000   # µs per beat when a file has no set_tempo

# the 16 General MIDI program families, 8 programs each; True = ignored by Aria
INSTRUMENT_CLASSES = [
    ("piano", False), ("chromatic", True), ("organ", False), ("guitar", False),
    ("bass", False), ("strings", False), ("ensemble", False), ("brass", False),
    ("reed", False), ("pipe", False), ("synth_lead", False), ("synth_pad", True),
    ("synth_effect", True), ("ethnic", True), ("percussive", True), ("sfx", True),
]
PROGRAM_TO_CLASS = [INSTRUMENT_CLASSES[p // 8][0] for p in range(128)]
IGNORED_CLASSES = {name for name, ignored in INSTRUMENT_CLASSES if ignored}
INSTRUMENTS = [name for name, ignored in INSTRUMENT_CLASSES if not ignored]  # 10, no drum
INSTRUMENT_PROGRAMS = {
    "piano": 0, "chromatic": 13, "organ": 16, "guitar": 24, "bass": 32, "strings": 40,
    "ensemble": 48, "brass": 56, "reed": 64, "pipe": 73, "synth_lead": 80, "synth_pad": 88,
    "synth_effect": 96, "ethnic": 104, "percussive": 112, "sfx": 120,
}
COMPOSERS = ["bach", "beethoven", "mozart", "chopin", "rachmaninoff", "liszt", "debussy",
             "schubert", "brahms", "ravel", "satie", "scarlatti"]
FORMS = ["sonata", "prelude", "nocturne", "étude", "waltz", "mazurka", "impromptu", "fugue"]
GENRES = ["jazz", "classical"]
DRUM_PITCHES = range(35, 82)

# -----------------------------------------------------------------------------
# Vocabulary: the official order (SPEC §A.2), 17727 ids

SPECIAL_TOKENS = ["<S>", "<E>", "<P>", "<U>", "<D>", "<T>"]
BOS_ID, EOS_ID, PAD_ID, UNK_ID, DIM_ID, SEG_ID = range(6)
VELOCITIES = list(range(0, 121, VELOCITY_STEP))  # 13 values; velocity 0 is never produced


def _build_vocab():
    vocab = list(SPECIAL_TOKENS)
    vocab += [("prefix", "instrument", x) for x in INSTRUMENTS + ["drum"]]
    vocab += [("prefix", "composer", x) for x in COMPOSERS]
    vocab += [("prefix", "form", x) for x in FORMS]
    vocab += [("prefix", "genre", x) for x in GENRES]
    vocab += [(inst, p, v) for inst in INSTRUMENTS for p in range(128) for v in VELOCITIES]
    vocab += [("drum", p) for p in DRUM_PITCHES]
    vocab += [("dur", d) for d in range(0, MAX_DUR_MS + 1, TIME_STEP_MS)]
    vocab += [("onset", o) for o in range(0, SEGMENT_MS, TIME_STEP_MS)]
    return vocab


VOCAB = _build_vocab()
VOCAB_SIZE = len(VOCAB)  # 17727
TOKEN_TO_ID = {tok: i for i, tok in enumerate(VOCAB)}
# checkpoints store this, so a model is never paired with a different vocabulary
VOCAB_HASH = hashlib.sha256(json.dumps(VOCAB, ensure_ascii=False).encode()).hexdigest()[:16]

PREFIX_START = 6
NOTE_START = TOKEN_TO_ID[("piano", 0, 0)]          # 39
NOTES_PER_INSTRUMENT = 128 * len(VELOCITIES)       # 1664
DRUM_START = TOKEN_TO_ID[("drum", 35)]             # 16679
DUR_START = TOKEN_TO_ID[("dur", 0)]                # 16726
ONSET_START = TOKEN_TO_ID[("onset", 0)]            # 17227
INSTRUMENT_PREFIX_ID = {x: TOKEN_TO_ID[("prefix", "instrument", x)] for x in INSTRUMENTS + ["drum"]}

# token classes, for grammar-constrained sampling and for the augmentations
SPECIAL, PREFIX, NOTE, DRUM, ONSET, DUR = range(6)
TOKEN_CLASS = np.empty(VOCAB_SIZE, dtype=np.uint8)
TOKEN_CLASS[:PREFIX_START] = SPECIAL
TOKEN_CLASS[PREFIX_START:NOTE_START] = PREFIX
TOKEN_CLASS[NOTE_START:DRUM_START] = NOTE
TOKEN_CLASS[DRUM_START:DUR_START] = DRUM
TOKEN_CLASS[DUR_START:ONSET_START] = DUR
TOKEN_CLASS[ONSET_START:] = ONSET


def note_id(instrument, pitch, velocity):
    return NOTE_START + INSTRUMENTS.index(instrument) * NOTES_PER_INSTRUMENT + pitch * 13 + velocity // 10


def onset_id(ms):
    return ONSET_START + ms // TIME_STEP_MS


def dur_id(ms):
    return DUR_START + ms // TIME_STEP_MS


def encode(tokens):
    """Official-style tokens (str / tuple; JSON lists accepted) -> ids; unknown -> <U>."""
    return [TOKEN_TO_ID.get(tuple(t) if isinstance(t, list) else t, UNK_ID) for t in tokens]


def decode(ids):
    """ids -> official-style tokens; out-of-range ids -> '<U>'."""
    return [VOCAB[i] if 0 <= i < VOCAB_SIZE else "<U>" for i in map(int, ids)]


def token_str(i):
    """A compact readable form of one id: 'piano:60:80', 'onset:120', '<T>'."""
    tok = VOCAB[i] if 0 <= i < VOCAB_SIZE else "<U>"
    return tok if isinstance(tok, str) else ":".join(str(x) for x in tok)


# -----------------------------------------------------------------------------
# Quantizers (SPEC §A.5). The official nearest-value search is a binary search
# whose path decides exact ties (onset 515 -> 510 but 545 -> 550); token ids
# depend on it, so the tables are built with the same search.

def _closest(values, x):
    left, right, closest = 0, len(values) - 1, values[0]
    while left <= right:
        mid = (left + right) // 2
        if abs(values[mid] - x) < abs(closest - x):
            closest = values[mid]
        if values[mid] < x:
            left = mid + 1
        else:
            right = mid - 1
    return closest


_ONSET_GRID = list(range(0, SEGMENT_MS, TIME_STEP_MS))
_DUR_GRID = list(range(0, MAX_DUR_MS + 1, TIME_STEP_MS))
ONSET_Q = [_closest(_ONSET_GRID, x) for x in range(SEGMENT_MS)]                      # ms in segment -> onset
DUR_Q = [max(_closest(_DUR_GRID, x), TIME_STEP_MS) for x in range(MAX_DUR_MS + 6)]   # ms -> dur (10..5000)
VELOCITY_Q = [0] + [max(_closest(VELOCITIES, v), 10) for v in range(1, 128)]


def quantize_dur(ms):
    return DUR_Q[ms] if 0 <= ms < len(DUR_Q) else (MAX_DUR_MS if ms > 0 else TIME_STEP_MS)


# -----------------------------------------------------------------------------
# MIDI parsing (SPEC §A.3)

class TokenizerError(Exception):
    """A MIDI file that cannot be read or tokenized; the message is one line naming the file."""


class Score:
    """A parsed MIDI file: notes paired, times still in ticks.

    notes:    (start_tick, end_tick, pitch, velocity, channel), stable-sorted by start;
              equal starts keep note-off order within a track, then track order (official)
    tempos:   (tick, µs_per_beat);  programs: (tick, channel, program)
    pedals:   (tick, channel, on), on = CC64 value >= 64
    """

    def __init__(self, ticks_per_beat, notes, tempos, programs, pedals, path="", metadata=None):
        self.ticks_per_beat = ticks_per_beat
        self.notes = notes
        self.tempos = tempos or [(0, DEFAULT_TEMPO)]
        self.programs = programs or [(0, 0, 0)]
        self.pedals = pedals
        self.path = path
        self.metadata = metadata or {}
        self._tempo_map = None

    def with_notes(self, notes):
        """A copy holding only `notes` (pedals, tempos and programs shared): slices and prompts."""
        return Score(self.ticks_per_beat, notes, self.tempos, self.programs, self.pedals,
                     self.path, self.metadata)

    @property
    def tempo_map(self):
        if self._tempo_map is None:
            self._tempo_map = TempoMap(self.tempos, self.ticks_per_beat)
        return self._tempo_map

    def tick_to_ms(self, tick):
        return self.tempo_map.duration_ms(0, tick)

    def __repr__(self):
        return f"Score({self.path!r}, {len(self.notes)} notes, tpb={self.ticks_per_beat})"


class TempoMap:
    """Tick intervals -> ms through a tempo map, correctly across tempo changes.

    Each piece is summed in the official order (tick * tempo * 1e-6 / tpb per segment,
    then x1e3 and Python's round) so ids match the official tokenizer bit for bit on
    files where it is right; its multi-tempo bug (SPEC §A.3) is not copied.
    """

    def __init__(self, tempos, tpb):
        self.ticks = [t for t, _ in tempos]
        self.scales = [tempo * 1e-6 / tpb for _, tempo in tempos]  # mido.tick2second's scale
        self.single = len(tempos) == 1

    def _segment(self, tick):
        # the tempo in force at `tick` (the first one also covers ticks before it, as officially)
        return max(bisect.bisect_right(self.ticks, tick) - 1, 0)

    def duration_ms(self, start, end):
        if self.single:
            return round((end - start) * self.scales[0] * 1e3)
        ticks, scales = self.ticks, self.scales
        k = self._segment(start)
        scale, cur, sec = scales[k], start, 0.0
        k += 1
        while k < len(ticks) and ticks[k] < end:
            sec += (ticks[k] - cur) * scale
            cur, scale = ticks[k], scales[k]
            k += 1
        return round((sec + (end - cur) * scale) * 1e3)

    def onsets_ms(self, origin, starts):
        """duration_ms(origin, s) for many s, sharing the running sum over tempo changes."""
        if self.single:
            scale = self.scales[0]
            return [round((s - origin) * scale * 1e3) for s in starts]
        ticks, scales = self.ticks, self.scales
        k0 = self._segment(origin)
        # running sums at each later tempo change, added in the order the per-call loop adds them
        piece_ticks, piece_secs, piece_scales = [origin], [0.0], [scales[k0]]
        cur, sec, scale = origin, 0.0, scales[k0]
        for k in range(k0 + 1, len(ticks)):
            sec += (ticks[k] - cur) * scale
            cur, scale = ticks[k], scales[k]
            piece_ticks.append(cur)
            piece_secs.append(sec)
            piece_scales.append(scale)
        out = []
        for s in starts:
            j = max(bisect.bisect_left(piece_ticks, s) - 1, 0)  # last piece starting strictly before s
            out.append(round((piece_secs[j] + (s - piece_ticks[j]) * piece_scales[j]) * 1e3))
        return out


def load_midi(src, metadata=None):
    """Parse a MIDI file (path, bytes, file object or mido.MidiFile) into a Score."""
    path = src if isinstance(src, (str, os.PathLike)) else getattr(src, "filename", "") or "<midi>"
    path = str(path)
    if isinstance(src, mido.MidiFile):
        mid = src
    else:
        if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
            raise TokenizerError(f"{path}: no such file")
        try:
            if isinstance(src, (bytes, bytearray)):
                import io
                mid = mido.MidiFile(file=io.BytesIO(src))
            elif hasattr(src, "read"):
                mid = mido.MidiFile(file=src)
            else:
                mid = mido.MidiFile(src)
        except EOFError:
            raise TokenizerError(f"{path}: truncated or empty MIDI file") from None
        except Exception as e:  # mido raises OSError/ValueError/KeyError/IndexError on junk
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{path}: not a readable MIDI file ({reason})") from None
    if not mid.ticks_per_beat or mid.ticks_per_beat <= 0:
        raise TokenizerError(f"{path}: unsupported MIDI timing (SMPTE or zero ticks per beat)")

    notes, tempos, programs, pedals = [], [], [], []
    for track in mid.tracks:
        tick = 0
        open_notes = {}  # (pitch, channel) -> [(start_tick, velocity), ...] in push order
        for msg in track:
            tick += msg.time
            kind = msg.type
            if kind == "note_on" and msg.velocity > 0:
                key = (msg.note, msg.channel)
                if key in open_notes:
                    open_notes[key].append((tick, msg.velocity))
                else:
                    open_notes[key] = [(tick, msg.velocity)]
            elif kind == "note_off" or kind == "note_on":
                key = (msg.note, msg.channel)
                held = open_notes.get(key)
                if held is None:
                    continue  # a note-off with no open note is ignored
                remain, closed = [], False
                for start, vel in held:
                    if start != tick:
                        notes.append((start, tick, key[0], vel, key[1]))
                        closed = True
                    else:
                        remain.append((start, vel))
                # a note-off at the note-on's own tick drops it (zero length), unless it
                # closed older notes, in which case the same-tick ones stay open (official)
                if closed and remain:
                    open_notes[key] = remain
                else:
                    del open_notes[key]
            elif kind == "control_change":
                if msg.control == 64:
                    pedals.append((tick, msg.channel, 0 if msg.value < 64 else 1))
            elif kind == "program_change":
                programs.append((tick, msg.channel, msg.program))
            elif kind == "set_tempo":
                tempos.append((tick, msg.tempo))
    key0 = lambda x: x[0]  # stable sorts: ties keep parse order
    notes.sort(key=key0)
    tempos.sort(key=key0)
    programs.sort(key=key0)
    pedals.sort(key=key0)
    return Score(mid.ticks_per_beat, notes, tempos, programs, pedals, path, metadata)


def _as_score(src):
    return src if isinstance(src, Score) else load_midi(src)


# -----------------------------------------------------------------------------
# Tokenization (SPEC §A.4-A.6)

def _normalize(score):
    """Drop ignored-instrument channels; map channels to instrument classes (SPEC §A.4)."""
    dropped = {ch for _, ch, prog in score.programs
               if ch != DRUM_CHANNEL and PROGRAM_TO_CLASS[prog] in IGNORED_CLASSES}
    notes, pedals, programs = score.notes, score.pedals, score.programs
    if dropped:
        notes = [n for n in notes if n[4] not in dropped]
        pedals = [p for p in pedals if p[1] not in dropped]
        programs = [p for p in programs if p[1] not in dropped]
    if not score.notes:
        raise TokenizerError(f"{score.path}: no notes")
    if not notes:
        raise TokenizerError(f"{score.path}: all notes are on ignored instruments")
    # the last program change per channel wins; channels with notes but no program are piano
    channel_class = {ch: PROGRAM_TO_CLASS[prog] for _, ch, prog in programs if ch != DRUM_CHANNEL}
    for n in notes:
        if n[4] != DRUM_CHANNEL and n[4] not in channel_class:
            channel_class[n[4]] = "piano"
    return notes, pedals, channel_class


def _pedal_intervals(pedals, last_note_end):
    """Per channel: sorted starts and ends of sustain intervals (SPEC §A.4.2)."""
    per_channel = {}
    open_at = {}
    for tick, ch, on in pedals:
        if on:
            if ch not in open_at:
                open_at[ch] = tick
        elif ch in open_at:
            starts, ends = per_channel.setdefault(ch, ([], []))
            starts.append(open_at.pop(ch))
            ends.append(tick)
    for ch, start in open_at.items():  # unclosed: ends at the last-starting note's end (official)
        starts, ends = per_channel.setdefault(ch, ([], []))
        starts.append(start)
        ends.append(last_note_end)
    return per_channel


def tokenize(src, *, dim=True, eos=True, keep_silence=False, metadata=None, rng=None):
    """MIDI (path, bytes, mido.MidiFile or Score) -> list of token ids.

    dim:          insert <D> ~100 tokens before the end (SPEC §A.6; official default True)
    eos:          end with <E>
    keep_silence: keep the silence before the first note (official remove_preceding_silence=False)
    metadata:     {"composer"|"form"|"genre": name} adds those prefix tokens when the name is known
    rng:          a random.Random: shuffles the prefix and draws the <D> offset as the official
                  tokenizer does; None gives a deterministic sequence (prefix in id order, <D>
                  exactly 100 tokens before the end)
    """
    score = _as_score(src)
    notes, pedals, channel_class = _normalize(score)
    tm = score.tempo_map

    prefix = {INSTRUMENT_PREFIX_ID[c] for c in channel_class.values()}
    if any(n[4] == DRUM_CHANNEL for n in notes):
        prefix.add(INSTRUMENT_PREFIX_ID["drum"])
    meta = {**score.metadata, **(metadata or {})}
    for kind, names in (("composer", COMPOSERS), ("form", FORMS), ("genre", GENRES)):
        if meta.get(kind) in names:
            prefix.add(TOKEN_TO_ID[("prefix", kind, meta[kind])])
    prefix = sorted(prefix)
    if rng is not None:
        rng.shuffle(prefix)

    intervals = _pedal_intervals(pedals, notes[-1][1])
    class_base = {ch: NOTE_START + INSTRUMENTS.index(c) * NOTES_PER_INSTRUMENT
                  for ch, c in channel_class.items()}
    origin = 0 if keep_silence else notes[0][0]
    onsets = tm.onsets_ms(origin, [n[0] for n in notes])

    body = []
    segment = 0
    for (start, end, pitch, vel, ch), t in zip(notes, onsets):
        seg = t // SEGMENT_MS
        if seg > segment:
            body.extend([SEG_ID] * (seg - segment))
            segment = seg
        onset = ONSET_START + ONSET_Q[t - seg * SEGMENT_MS] // TIME_STEP_MS
        if ch == DRUM_CHANNEL:
            body.append(DRUM_START + pitch - 35 if 35 <= pitch <= 81 else UNK_ID)
            body.append(onset)
            continue
        iv = intervals.get(ch)
        if iv is not None:
            # the pedal holds a note that ends strictly inside a pressed interval (official rule)
            j = bisect.bisect_left(iv[0], end) - 1
            if j >= 0 and end < iv[1][j]:
                end = iv[1][j]
        body.append(class_base[ch] + pitch * 13 + VELOCITY_Q[vel] // 10)
        body.append(onset)
        body.append(DUR_START + quantize_dur(tm.duration_ms(start, end)) // TIME_STEP_MS)

    offset = -100 + (rng.randint(-10, 10) if rng is not None else 0)
    if dim and len(body) > 150:
        insert_dim(body, offset)
    return prefix + [BOS_ID] + body + ([EOS_ID] if eos else [])


def insert_dim(body, offset=-100):
    """Insert <D> at `offset` from the end, moved back to the start of the event it would split."""
    cls = TOKEN_CLASS[body[offset]]
    if cls == ONSET:
        offset -= 1
    elif cls == DUR:
        offset -= 2
    body.insert(offset, DIM_ID)
    return body


# -----------------------------------------------------------------------------
# Helpers for the stages: prompts, note slices

def prompt(src, seconds=15.0):
    """Prompt ids for generation: the notes starting in the first `seconds` (SPEC §D.1).

    Durations are kept whole; a pedal press still held at the cut is dropped.
    No notes in that window gives the from-scratch prompt (piano prefix, <S>).
    """
    score = _as_score(src)
    limit = seconds * 1000
    tm = score.tempo_map
    notes = [n for n in score.notes if tm.duration_ms(0, n[0]) <= limit]
    if not notes:
        return [INSTRUMENT_PREFIX_ID["piano"], BOS_ID]
    pedals = [p for p in score.pedals if tm.duration_ms(0, p[0]) <= limit]
    if pedals and pedals[-1][2] == 1:
        pedals.pop()
    cut = score.with_notes(notes)
    cut.pedals = pedals
    return tokenize(cut, dim=False, eos=False)


def note_chunks(src, notes_per_chunk=300, max_len=2048):
    """Consecutive `notes_per_chunk`-note slices, each tokenized without <D>, cut to max_len
    and ending in <E>: exactly what the official embedding API feeds the model (SPEC §D.4)."""
    score = _as_score(src)
    chunks = []
    for i in range(0, len(score.notes), notes_per_chunk):
        ids = tokenize(score.with_notes(score.notes[i:i + notes_per_chunk]), dim=False)[:max_len]
        ids[-1] = EOS_ID
        chunks.append(ids)
    return chunks


def random_slice(src, rng, min_notes=100, max_notes=650):
    """A random contiguous slice of min..max notes (a contrastive view, paper §3.3 / SPEC §C.3)."""
    score = _as_score(src)
    n = len(score.notes)
    length = rng.randint(min_notes, max_notes)
    start = rng.randint(0, n - min_notes) if n > min_notes else 0
    return score.with_notes(score.notes[start:start + length])


# -----------------------------------------------------------------------------
# Detokenization (SPEC §A.7): ids -> notes in ms -> a type-0 MIDI file at 1 tick = 1 ms

def detokenize_notes(ids):
    """ids -> (notes, channel_programs); notes are (start_ms, end_ms, pitch, velocity, channel).

    Channels are assigned to instrument prefixes in order (skipping 9; drums on 9).
    Notes of an instrument without a prefix are dropped, as officially.
    """
    ids = [i if 0 <= i < VOCAB_SIZE else UNK_ID for i in map(int, ids)]
    channel_of, programs = {}, {}
    next_channel = 0
    for i in ids:  # prefix scan: instrument prefixes before the first event
        if TOKEN_CLASS[i] == PREFIX:
            tok = VOCAB[i]
            if tok[1] != "instrument" or tok[2] in channel_of:
                continue
            if tok[2] == "drum":
                channel_of["drum"] = DRUM_CHANNEL
                programs[DRUM_CHANNEL] = 0
            else:
                if next_channel == DRUM_CHANNEL:
                    next_channel += 1
                channel_of[tok[2]] = next_channel
                programs[next_channel] = INSTRUMENT_PROGRAMS[tok[2]]
                next_channel += 1
        elif TOKEN_CLASS[i] != SPECIAL:
            break
    notes, base, n = [], 0, len(ids)
    for k in range(n):
        i = ids[k]
        cls = TOKEN_CLASS[i]
        if cls == SPECIAL:
            if i == SEG_ID:
                base += SEGMENT_MS
        elif cls == NOTE and k + 2 < n and TOKEN_CLASS[ids[k + 1]] == ONSET and TOKEN_CLASS[ids[k + 2]] == DUR:
            inst, pitch, vel = VOCAB[i]
            if inst in channel_of:
                start = base + VOCAB[ids[k + 1]][1]
                notes.append((start, start + VOCAB[ids[k + 2]][1], pitch, vel, channel_of[inst]))
        elif cls == DRUM and k + 1 < n and TOKEN_CLASS[ids[k + 1]] == ONSET and "drum" in channel_of:
            start = base + VOCAB[ids[k + 1]][1]
            notes.append((start, start + TIME_STEP_MS, VOCAB[i][1], DRUM_VELOCITY, DRUM_CHANNEL))
    return notes, programs


def resolve_overlaps(notes):
    """Cut a note short where the same pitch on the same channel is struck again (MIDI can't overlap)."""
    last = {}
    out = sorted(notes, key=lambda n: (n[4], n[2], n[0], n[1]))
    for idx, (start, end, pitch, vel, ch) in enumerate(out):
        prev = last.get((ch, pitch))
        if prev is not None and out[prev][1] > start:
            out[prev] = out[prev][:1] + (start,) + out[prev][2:]
        last[(ch, pitch)] = idx
    return out  # a note cut to zero length is still written, as officially (it reparses as a re-strike)


def notes_to_midi(notes, programs):
    """Notes in ms -> a type-0 mido.MidiFile with 500 ticks per beat at 120 bpm (1 tick = 1 ms)."""
    events = []  # (tick, order, message): at equal ticks note-offs come before note-ons
    for start, end, pitch, vel, ch in resolve_overlaps(notes):
        events.append((start, 1, mido.Message("note_on", channel=ch, note=pitch, velocity=vel)))
        events.append((end, 0, mido.Message("note_on", channel=ch, note=pitch, velocity=0)))
    events.sort(key=lambda e: (e[0], e[1]))
    # tempo and programs first: the official writer puts the program after tick-0 notes (SPEC §G.15)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=DEFAULT_TEMPO, time=0)])
    track += [mido.Message("program_change", channel=ch, program=p, time=0)
              for ch, p in sorted(programs.items()) if ch != DRUM_CHANNEL]
    now = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    mid = mido.MidiFile(type=0, ticks_per_beat=500)
    mid.tracks.append(track)
    return mid


def detokenize(ids):
    """ids -> mido.MidiFile (SPEC §A.7). Incomplete events and unknown ids are skipped."""
    return notes_to_midi(*detokenize_notes(ids))


# -----------------------------------------------------------------------------
# Augmentation on token ids (paper §3.2: pitch ±5, velocity ±10, tempo ±20%; SPEC §A.8)

def _note_mask(ids):
    return (ids >= NOTE_START) & (ids < DRUM_START)


def pitch_shift(ids, k):
    """Transpose notes by k semitones; notes leaving 0..127 become <U> (their onset/dur stay)."""
    ids = np.array(ids, dtype=np.int64)
    mask = _note_mask(ids)
    pitch = ((ids - NOTE_START) % NOTES_PER_INSTRUMENT) // 13
    ok = (pitch + k >= 0) & (pitch + k <= 127)
    ids[mask & ok] += 13 * k
    ids[mask & ~ok] = UNK_ID
    return ids


def velocity_shift(ids, step):
    """Move note velocities by step bins (10 each), clamped to 10..120."""
    ids = np.array(ids, dtype=np.int64)
    mask = _note_mask(ids)
    v = (ids - NOTE_START) % 13
    ids[mask] += np.clip(v[mask] + step, 1, 12) - v[mask]
    return ids


def _q10(x):
    return round(x / TIME_STEP_MS) * TIME_STEP_MS


def tempo_scale(ids, factor, rng=None):
    """Stretch time by `factor` (official HEAD tempo_aug, SPEC §A.8), re-segmenting across <T>.

    Events are regrouped by time; with an rng, events sharing an onset are shuffled (mixup).
    <U>/<P> are dropped, <E> moves to the end and <D> follows the events at its time.
    The output may be longer or shorter than the input.
    """
    ids = [int(i) for i in ids]
    n = len(ids)
    out = []
    k = 0
    while k < n and (ids[k] == BOS_ID or TOKEN_CLASS[ids[k]] == PREFIX):
        out.append(ids[k])
        k += 1
    groups = {}   # source time -> list of events (tuples of ids, onset replaced later)
    dims = {}     # source time -> count of <D> re-emitted after that time's events
    segment, last_time, has_eos = 0, None, False
    while k < n:
        i = ids[k]
        cls = TOKEN_CLASS[i]
        if cls == NOTE and k + 2 < n and TOKEN_CLASS[ids[k + 1]] == ONSET and TOKEN_CLASS[ids[k + 2]] == DUR:
            last_time = segment * SEGMENT_MS + (ids[k + 1] - ONSET_START) * TIME_STEP_MS
            groups.setdefault(last_time, []).append((i, (ids[k + 2] - DUR_START) * TIME_STEP_MS))
            k += 3
            continue
        # <U> + onset with no dur can only be an out-of-vocabulary drum (pitch outside 35..81): the
        # official code, working on tokens, keeps it as a drum event, so it is kept here too
        if (cls == DRUM or (i == UNK_ID and (k + 2 >= n or TOKEN_CLASS[ids[k + 2]] != DUR))) \
                and k + 1 < n and TOKEN_CLASS[ids[k + 1]] == ONSET:
            last_time = segment * SEGMENT_MS + (ids[k + 1] - ONSET_START) * TIME_STEP_MS
            groups.setdefault(last_time, []).append((i, None))
            k += 2
            continue
        if i == SEG_ID:
            segment += 1
        elif i == EOS_ID:
            has_eos = True
        elif i == DIM_ID:
            t = last_time if last_time is not None else -1
            dims[t] = dims.get(t, 0) + 1
        k += 1  # anything else (<U>, <P>, stray onset/dur, malformed events) is dropped
    out.extend([DIM_ID] * dims.pop(-1, 0))
    segment = 0
    for t in sorted(groups):
        events = groups[t]
        if rng is not None:
            rng.shuffle(events)
        tt = _q10(t * factor)
        seg = tt // SEGMENT_MS
        if seg > segment:
            out.extend([SEG_ID] * (seg - segment))
            segment = seg
        onset = onset_id(tt % SEGMENT_MS)
        for tok, dur in events:
            out.append(tok)
            out.append(onset)
            if dur is not None:
                out.append(dur_id(min(max(_q10(dur * factor), TIME_STEP_MS), MAX_DUR_MS)))
        out.extend([DIM_ID] * dims.pop(t, 0))
    if has_eos:
        out.append(EOS_ID)
    return out


def per_piece(ids, fn):
    """Apply fn to each <E>-terminated piece of a packed sequence, then cut or pad with <P> to
    the input length: the official concat wrapper, so each file gets its own random draw."""
    ids = np.asarray(ids, dtype=np.int64)
    ends = np.flatnonzero(ids == EOS_ID) + 1
    parts = [np.asarray(fn(p), dtype=np.int64) for p in np.split(ids, ends) if len(p)]
    return fit_length(np.concatenate(parts) if parts else ids, len(ids))


def augment(ids, rng, pitch=5, velocity=1, tempo=0.2, mixup=True, fit=True):
    """Training augmentation (SPEC §A.8 `export_data_aug`): tempo, then pitch, then velocity,
    drawn per piece. `rng` is a random.Random, so a seed reproduces it. fit=False keeps the
    stretched length (one piece, e.g. a contrastive view whose <E> must survive)."""
    def one(part):
        if tempo:
            part = tempo_scale(part, rng.uniform(1 - tempo, 1 + tempo), rng if mixup else None)
        if pitch:
            part = pitch_shift(part, rng.randint(-pitch, pitch))
        if velocity:
            part = velocity_shift(part, rng.randint(-velocity, velocity))
        return part
    return per_piece(ids, one) if fit else np.asarray(one(np.asarray(ids, dtype=np.int64)), dtype=np.int64)


def fit_length(ids, length):
    """Truncate or right-pad with <P>."""
    ids = np.asarray(ids, dtype=np.int64)[:length]
    return np.concatenate([ids, np.full(length - len(ids), PAD_ID, dtype=np.int64)])


# -----------------------------------------------------------------------------
# CLI

def _readable(ids):
    lines, event = [], []
    for i in ids:
        cls = TOKEN_CLASS[i] if 0 <= i < VOCAB_SIZE else SPECIAL
        if cls in (NOTE, DRUM) and event:
            lines.append(" ".join(event))
            event = []
        if cls in (NOTE, DRUM, ONSET, DUR):
            event.append(token_str(i))
        else:
            if event:
                lines.append(" ".join(event))
                event = []
            lines.append(token_str(i))
    if event:
        lines.append(" ".join(event))
    return "\n".join(lines)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Tokenize MIDI files with the Aria tokenizer.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("files", nargs="+", help="MIDI files")
    ap.add_argument("--json", action="store_true", help='one JSON line per file: {"file", "ids"} or {"file", "error"}')
    ap.add_argument("--no-dim", dest="dim", action="store_false", help="leave out the <D> token")
    ap.add_argument("--keep_silence", action="store_true", help="keep the silence before the first note")
    args = ap.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            ids = tokenize(path, dim=args.dim, keep_silence=args.keep_silence)
        except TokenizerError as e:
            failed += 1
            if args.json:
                print(json.dumps({"file": path, "error": str(e)}), flush=True)
            else:
                print(f"error: {e}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"file": path, "ids": ids}), flush=True)
        else:
            print(f"# {path}: {len(ids)} tokens")
            print(_readable(ids))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
