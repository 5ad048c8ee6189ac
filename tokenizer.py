"""
Aria's MIDI tokenizer: MIDI (via mido) <-> token ids, exactly the ids of the official
`ariautils.tokenizer.AbsTokenizer` that trained the released checkpoints (paper §3.1; the token
layout is in README), and of its pedal mode (`pedal=True`: the official include_pedal, the demo
checkpoint's). Also the augmentations, prompts and note slices of the stages.
"Official" is EleutherAI/aria-utils @ e122d03 (paths ariautils/...) and EleutherAI/aria @ b0486c8.
`python tokenizer.py song.mid` prints readable tokens (--json: one line of ids per file).

No torch here: data preparation runs this in many worker processes. It is much faster than the official
code because it parses once (no deep copies) and looks tempo and pedal changes up by bisection.
"""
import bisect
import hashlib
import io
import json
import operator
import os
import sys

import mido
import numpy as np

# -----------------------------------------------------------------------------
# Configuration (official ariautils/config/config.json, section `tokenizer.abs`)

TIME_STEP_MS = 10        # onset/duration grid (paper §3.1)
SEGMENT_MS = 5000        # onsets are relative to 5000 ms segments marked by <T>
MAX_DUR_MS = 5000
VELOCITY_STEP = 10       # 12 reachable bins, 10..120 (official AbsTokenizer._quantize_velocity)
DRUM_VELOCITY = 60       # only used when writing MIDI
DRUM_CHANNEL = 9
DEFAULT_TEMPO = 500000   # µs per beat when a file has no set_tempo

# the 16 General MIDI program families of 8 programs: (name, program written to MIDI, ignored by Aria)
INSTRUMENT_CLASSES = [
    ("piano", 0, False), ("chromatic", 13, True), ("organ", 16, False), ("guitar", 24, False),
    ("bass", 32, False), ("strings", 40, False), ("ensemble", 48, False), ("brass", 56, False),
    ("reed", 64, False), ("pipe", 73, False), ("synth_lead", 80, False), ("synth_pad", 88, True),
    ("synth_effect", 96, True), ("ethnic", 104, True), ("percussive", 112, True), ("sfx", 120, True),
]
PROGRAM_TO_CLASS = [INSTRUMENT_CLASSES[p // 8][0] for p in range(128)]
INSTRUMENTS = [name for name, _, ignored in INSTRUMENT_CLASSES if not ignored]  # 10, no drum
INSTRUMENT_PROGRAMS = {name: program for name, program, _ in INSTRUMENT_CLASSES}
COMPOSERS = ["bach", "beethoven", "mozart", "chopin", "rachmaninoff", "liszt", "debussy",
             "schubert", "brahms", "ravel", "satie", "scarlatti"]
FORMS = ["sonata", "prelude", "nocturne", "étude", "waltz", "mazurka", "impromptu", "fugue"]
GENRES = ["jazz", "classical"]

# -----------------------------------------------------------------------------
# Vocabulary: the official order (AbsTokenizer.__init__), 17727 ids

BOS_ID, EOS_ID = 0, 1  # <S>, <E>
PAD_ID, UNK_ID = 2, 3  # <P>, <U>
DIM_ID, SEG_ID = 4, 5  # <D>, <T>
VELOCITIES = list(range(0, 121, VELOCITY_STEP))  # 13 values; velocity 0 is never produced

VOCAB = ["<S>", "<E>", "<P>", "<U>", "<D>", "<T>"]
VOCAB += [("prefix", "instrument", x) for x in INSTRUMENTS + ["drum"]]
VOCAB += [("prefix", "composer", x) for x in COMPOSERS]
VOCAB += [("prefix", "form", x) for x in FORMS]
VOCAB += [("prefix", "genre", x) for x in GENRES]
VOCAB += [(inst, p, v) for inst in INSTRUMENTS for p in range(128) for v in VELOCITIES]
VOCAB += [("drum", p) for p in range(35, 82)]
VOCAB += [("dur", d) for d in range(0, MAX_DUR_MS + 1, TIME_STEP_MS)]
VOCAB += [("onset", o) for o in range(0, SEGMENT_MS, TIME_STEP_MS)]
VOCAB_SIZE = len(VOCAB)  # 17727
# pedal mode (official include_pedal; the demo checkpoint): two tokens appended, 17729 ids
PED_ON_ID, PED_OFF_ID = VOCAB_SIZE, VOCAB_SIZE + 1
VOCAB += ["<PED_ON>", "<PED_OFF>"]
PEDAL_VOCAB_SIZE = len(VOCAB)
TOKEN_TO_ID = {tok: i for i, tok in enumerate(VOCAB)}
# checkpoints and datasets store these, so a model is never paired with a different vocabulary
VOCAB_HASH, PEDAL_VOCAB_HASH = (hashlib.sha256(json.dumps(VOCAB[:n], ensure_ascii=False).encode())
                                .hexdigest()[:16] for n in (VOCAB_SIZE, PEDAL_VOCAB_SIZE))

PREFIX_START = 6
NOTE_START = TOKEN_TO_ID[("piano", 0, 0)]          # 39
NOTES_PER_INSTRUMENT = 128 * len(VELOCITIES)       # 1664
DRUM_START = TOKEN_TO_ID[("drum", 35)]             # 16679
DUR_START = TOKEN_TO_ID[("dur", 0)]                # 16726
ONSET_START = TOKEN_TO_ID[("onset", 0)]            # 17227
INSTRUMENT_PREFIX_ID = {x: TOKEN_TO_ID[("prefix", "instrument", x)] for x in INSTRUMENTS + ["drum"]}

# token classes (grammar-constrained sampling, augmentations): each over its ids, in vocabulary order
SPECIAL, PREFIX = 0, 1
NOTE, DRUM = 2, 3
ONSET, DUR = 4, 5
PEDAL = 6
TOKEN_CLASS = np.repeat(np.array([SPECIAL, PREFIX, NOTE, DRUM, DUR, ONSET, PEDAL], dtype=np.uint8), np.diff(
    [0, PREFIX_START, NOTE_START, DRUM_START, DUR_START, ONSET_START, VOCAB_SIZE, PEDAL_VOCAB_SIZE]))
_CLASS = TOKEN_CLASS.tolist()  # for Python loops: a list lookup is several times faster than numpy's


def is_pedal(ids):
    """Whether ids hold pedal tokens, so only a pedal-mode model (PEDAL_VOCAB_SIZE) can read them."""
    return len(ids) > 0 and int(np.max(ids)) >= VOCAB_SIZE


def note_id(instrument, pitch, velocity):
    return NOTE_START + INSTRUMENTS.index(instrument) * NOTES_PER_INSTRUMENT + pitch * 13 + velocity // 10


def onset_id(ms):
    return ONSET_START + ms // TIME_STEP_MS


def dur_id(ms):
    return DUR_START + ms // TIME_STEP_MS


def token_str(i):
    """A compact readable form of one id: 'piano:60:80', 'onset:120', '<T>'."""
    tok = VOCAB[i] if 0 <= i < PEDAL_VOCAB_SIZE else "<U>"
    return tok if isinstance(tok, str) else ":".join(str(x) for x in tok)


# -----------------------------------------------------------------------------
# Quantizers. The official nearest-value search (ariautils/tokenizer/_base.py, Tokenizer._find_closest_int)
# is a binary search whose path decides exact ties (onset 515 -> 510 but 545 -> 550); token ids
# depend on it, so the tables are built with the same search.

def _closest(values, x):
    left, right = 0, len(values) - 1
    closest = values[0]
    while left <= right:
        mid = (left + right) // 2
        if abs(values[mid] - x) < abs(closest - x):
            closest = values[mid]
        if values[mid] < x:
            left = mid + 1
        else:
            right = mid - 1
    return closest


_ONSET_GRID = list(range(0, SEGMENT_MS, TIME_STEP_MS))  # lists: indexing a range is 3x slower at import
_DUR_GRID = list(range(0, MAX_DUR_MS + 1, TIME_STEP_MS))
ONSET_Q = [_closest(_ONSET_GRID, x) for x in range(SEGMENT_MS)]                     # ms in segment -> onset
_ONSET_IDS = [ONSET_START + q // TIME_STEP_MS for q in ONSET_Q]                      # ms in segment -> its id
DUR_Q = [max(_closest(_DUR_GRID, x), TIME_STEP_MS) for x in range(MAX_DUR_MS + 6)]  # ms -> dur (10..5000)
VELOCITY_Q = [0] + [max(_closest(VELOCITIES, v), 10) for v in range(1, 128)]


def quantize_dur(ms):
    return DUR_Q[ms] if 0 <= ms < len(DUR_Q) else (MAX_DUR_MS if ms > 0 else TIME_STEP_MS)


# -----------------------------------------------------------------------------
# MIDI parsing (official ariautils/midi.py: MidiDict.from_midi, midi_to_dict, _extract_track_data)

class TokenizerError(Exception):
    """A MIDI file that cannot be read or tokenized; the message is one line naming the file."""


class Score:
    """A parsed MIDI file: notes paired, times still in ticks.

    notes:    (start_tick, end_tick, pitch, velocity, channel), stable-sorted by start;
              equal starts keep note-off order within a track, then track order (official)
    tempos:   (tick, µs_per_beat);  programs: (tick, channel, program)
    pedals:   (tick, channel, on), on = CC64 value >= 64

    Ticks become ms correctly across tempo changes, each piece summed in the official order
    (ticks * tempo * 1e-6 / tpb, then x1e3 and Python's round) so ids match the official
    tokenizer bit for bit where it is right; not the multi-tempo bug of its midi.py get_duration_ms.
    """

    def __init__(self, ticks_per_beat, notes, tempos, programs, pedals, path="", sliced=False):
        self.ticks_per_beat = ticks_per_beat
        self.notes = notes
        self.tempos = tempos or [(0, DEFAULT_TEMPO)]
        self.programs = programs or [(0, 0, 0)]
        self.pedals = pedals
        self.path = path
        self.sliced = sliced  # part of a file: its pedal tokens are its own (_own_pedals)
        self._ticks = [t for t, _ in self.tempos]
        self._scales = [tempo * 1e-6 / ticks_per_beat for _, tempo in self.tempos]  # mido.tick2second's

    def with_notes(self, notes):
        """A copy holding only `notes` (pedals, tempos and programs shared): note slices."""
        return Score(self.ticks_per_beat, notes, self.tempos, self.programs, self.pedals, self.path,
                     sliced=True)

    def duration_ms(self, start, end):
        """ms from tick `start` to tick `end` (the first tempo also covers ticks before it, as officially)."""
        ticks, scales = self._ticks, self._scales
        if len(ticks) == 1:
            return round((end - start) * scales[0] * 1e3)
        k = max(bisect.bisect_right(ticks, start), 1)  # the next tempo change
        scale, cur = scales[k - 1], start
        sec = 0.0
        while k < len(ticks) and ticks[k] < end:
            sec += (ticks[k] - cur) * scale
            cur, scale = ticks[k], scales[k]
            k += 1
        return round((sec + (end - cur) * scale) * 1e3)

    def onsets_ms(self, origin, starts):
        """duration_ms(origin, s) for ascending ticks s, its running sum carried from one s to the next."""
        ticks, scales = self._ticks, self._scales
        if len(ticks) == 1:
            scale = scales[0]
            return [round((s - origin) * scale * 1e3) for s in starts]
        k = max(bisect.bisect_right(ticks, origin), 1)  # the next tempo change
        scale, cur = scales[k - 1], origin
        sec = 0.0
        out = []
        for s in starts:
            while k < len(ticks) and ticks[k] < s:
                sec += (ticks[k] - cur) * scale
                cur, scale = ticks[k], scales[k]
                k += 1
            out.append(round((sec + (s - cur) * scale) * 1e3))
        return out


def load_midi(src):
    """A MIDI file (path, bytes, file object or mido.MidiFile) -> Score; a Score is returned as is."""
    if isinstance(src, Score):
        return src
    path = str(src if isinstance(src, (str, os.PathLike)) else getattr(src, "filename", "") or "<midi>")
    if isinstance(src, mido.MidiFile):
        mid = src
    else:
        if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
            raise TokenizerError(f"{path}: no such file")
        try:
            src = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
            mid = mido.MidiFile(file=src) if hasattr(src, "read") else mido.MidiFile(src)
        except EOFError:
            raise TokenizerError(f"{path}: truncated or empty MIDI file") from None
        except Exception as e:  # mido raises OSError/ValueError/KeyError/IndexError on junk
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{path}: not a readable MIDI file ({reason})") from None
    if not mid.ticks_per_beat or mid.ticks_per_beat <= 0:
        raise TokenizerError(f"{path}: unsupported MIDI timing (SMPTE or zero ticks per beat)")

    notes, tempos = [], []
    programs, pedals = [], []
    for track in mid.tracks:
        tick = 0
        open_notes = {}  # (pitch, channel) -> [(start_tick, velocity), ...] in push order
        for msg in track:
            tick += msg.time
            kind = msg.type
            if kind == "note_on" and msg.velocity > 0:
                open_notes.setdefault((msg.note, msg.channel), []).append((tick, msg.velocity))
            elif kind == "note_off" or kind == "note_on":
                held = open_notes.pop((msg.note, msg.channel), None)
                if held is None:
                    continue  # a note-off with no open note is ignored
                remain = []
                for start, vel in held:
                    if start != tick:
                        notes.append((start, tick, msg.note, vel, msg.channel))
                    else:
                        remain.append((start, vel))
                # a note-off at the note-on's own tick drops it (zero length), unless it
                # closed older notes, in which case the same-tick ones stay open (official)
                if remain and len(remain) < len(held):
                    open_notes[(msg.note, msg.channel)] = remain
            elif kind == "control_change" and msg.control == 64:
                pedals.append((tick, msg.channel, 0 if msg.value < 64 else 1))
            elif kind == "program_change":
                programs.append((tick, msg.channel, msg.program))
            elif kind == "set_tempo":
                tempos.append((tick, msg.tempo))
    for events in (notes, tempos, programs, pedals):
        events.sort(key=lambda x: x[0])  # stable: ties keep parse order
    return Score(mid.ticks_per_beat, notes, tempos, programs, pedals, path)


# -----------------------------------------------------------------------------
# Tokenization (official ariautils/tokenizer/absolute.py: AbsTokenizer._tokenize_midi_dict, _format)

def tokenize(src, *, dim=True, eos=True, keep_silence=False, metadata=None, rng=None, pedal=False):
    """MIDI (anything load_midi takes) -> list of token ids.

    dim:          insert <D> ~100 tokens before the end (official AbsTokenizer._format; default True)
    eos:          end with <E>
    keep_silence: keep the silence before the first note (official remove_preceding_silence=False)
    metadata:     {"composer"|"form"|"genre": name} adds those prefix tokens when the name is known
    rng:          a random.Random shuffles the prefix and draws the <D> offset (-100 ± 10) as the
                  official tokenizer does; None: prefix in id order, <D> exactly 100 from the end
    pedal:        the official include_pedal mode (PEDAL_VOCAB_SIZE; the demo checkpoint's): each
                  sustain-pedal message also becomes <PED_ON>/<PED_OFF> + its onset, in time order
                  with the notes (durations still hold the pedal). Piano only, as officially.
    """
    score = load_midi(src)
    if not score.notes:
        raise TokenizerError(f"{score.path}: no notes")
    # a channel with any program of an ignored class is dropped, pedals too (official remove_instruments)
    dropped = {ch for _, ch, prog in score.programs
               if ch != DRUM_CHANNEL and PROGRAM_TO_CLASS[prog] not in INSTRUMENTS}
    notes, pedals = score.notes, score.pedals
    if dropped:
        notes = [n for n in notes if n[4] not in dropped]
        pedals = [p for p in pedals if p[1] not in dropped]
    if not notes:
        raise TokenizerError(f"{score.path}: all notes are on ignored instruments")
    # the last program change per channel wins; channels with notes but no program are piano
    channels = {n[4] for n in notes}
    channel_class = {ch: PROGRAM_TO_CLASS[prog] for _, ch, prog in score.programs
                     if ch != DRUM_CHANNEL and ch not in dropped}
    channel_class.update((ch, "piano") for ch in channels - channel_class.keys() - {DRUM_CHANNEL})
    classes = set(channel_class.values())
    if pedal and classes != {"piano"}:
        found = ", ".join(sorted(classes - {"piano"})) or "no piano"
        raise TokenizerError(f"{score.path}: pedal mode takes piano only, this file has {found}")

    prefix = {INSTRUMENT_PREFIX_ID[c] for c in classes | ({"drum"} if DRUM_CHANNEL in channels else set())}
    prefix |= {TOKEN_TO_ID[("prefix", k, v)] for k, v in (metadata or {}).items()
               if k in ("composer", "form", "genre") and ("prefix", k, v) in TOKEN_TO_ID}
    prefix = sorted(prefix)
    if rng is not None:
        rng.shuffle(prefix)

    # per channel, the sorted start and end ticks of its sustain intervals; a pedal left pressed is
    # released at the end of the last-starting note (official MidiDict._build_pedal_intervals)
    intervals, open_at = {}, {}
    for tick, ch, on in pedals + [(notes[-1][1], ch, 0) for ch in {p[1] for p in pedals}]:
        if on:
            open_at.setdefault(ch, tick)
        elif ch in open_at:
            starts, ends = intervals.setdefault(ch, ([], []))
            starts.append(open_at.pop(ch))
            ends.append(tick)
    class_base = {ch: NOTE_START + INSTRUMENTS.index(c) * NOTES_PER_INSTRUMENT
                  for ch, c in channel_class.items()}
    events = notes
    if pedal:  # pedal changes as events (tick, None, on, 0, channel), after the notes at their tick
        own = _own_pedals(notes, pedals) if score.sliced else pedals
        events = sorted(notes + [(t, None, on, 0, ch) for t, ch, on in own], key=operator.itemgetter(0))
    origin = 0 if keep_silence else events[0][0]
    onsets = score.onsets_ms(origin, [e[0] for e in events])

    body = []
    segment = 0
    for (start, end, pitch, vel, ch), t in zip(events, onsets):
        seg = t // SEGMENT_MS
        if seg > segment:
            body.extend([SEG_ID] * (seg - segment))
            segment = seg
        onset = _ONSET_IDS[t - seg * SEGMENT_MS]
        if ch == DRUM_CHANNEL:  # a pedal on channel 9 too, as <U> (official)
            body += (DRUM_START + pitch - 35 if 35 <= pitch <= 81 else UNK_ID, onset)
            continue
        if end is None:
            body += (PED_OFF_ID - pitch, onset)
            continue
        iv = intervals.get(ch)
        if iv is not None:
            # the pedal holds a note that ends strictly inside a pressed interval (official rule)
            j = bisect.bisect_left(iv[0], end) - 1  # the last interval starting before `end`
            if j >= 0 and end < iv[1][j]:
                end = iv[1][j]
        body += (class_base[ch] + pitch * 13 + VELOCITY_Q[vel] // 10, onset,
                 DUR_START + quantize_dur(score.duration_ms(start, end)) // TIME_STEP_MS)

    offset = -100 + (rng.randint(-10, 10) if rng is not None else 0)
    if dim and len(body) > 150:
        insert_dim(body, offset)
    return prefix + [BOS_ID] + body + ([EOS_ID] if eos else [])


def _own_pedals(notes, pedals):
    """A note slice's own pedal changes (pedal mode): a pedal held at its first onset pressed there,
    the changes up to its last note-off, and the release of a pedal still held then."""
    lo, hi = notes[0][0], max(n[1] for n in notes)
    k, j = bisect.bisect_left(pedals, (lo,)), bisect.bisect_right(pedals, (hi, 16))  # by tick
    own = [(lo,) + pedals[k - 1][1:]] if k and pedals[k - 1][2] else []
    own += pedals[k:j]
    if own and own[-1][2]:
        own += next(([p] for p in pedals[j:] if not p[2]), [])
    return own


def insert_dim(body, offset=-100):
    """Insert <D> at `offset` from the end, moved back to the start of the event it would split."""
    offset -= {ONSET: 1, DUR: 2}.get(TOKEN_CLASS[body[offset]], 0)  # how far into its event
    body.insert(offset, DIM_ID)
    return body


def prompt(src, seconds=15.0, pedal=False):
    """Prompt ids for generation (official aria/inference/__init__.py, get_inference_prompt): the notes
    starting in the first `seconds`, durations whole, the pedal messages up to the cut but for a last press
    (a pedal held at the cut is released at the last note's end); no notes: the from-scratch `piano <S>`."""
    score = load_midi(src)
    limit = seconds * 1000
    notes = [n for n in score.notes if score.duration_ms(0, n[0]) <= limit]
    if not notes:
        return [INSTRUMENT_PREFIX_ID["piano"], BOS_ID]
    pedals = [p for p in score.pedals if score.duration_ms(0, p[0]) <= limit]
    if pedals and pedals[-1][2] == 1:
        pedals.pop()
    return tokenize(Score(score.ticks_per_beat, notes, score.tempos, score.programs, pedals, score.path),
                    dim=False, eos=False, pedal=pedal)


def note_chunks(src, notes_per_chunk=300, max_len=2048, pedal=False):
    """Consecutive `notes_per_chunk`-note slices, each tokenized without <D>, cut to max_len and ending
    in <E>: exactly what the official aria/embedding.py get_global_embedding_from_midi feeds the model."""
    score = load_midi(src)
    chunks = [tokenize(score.with_notes(score.notes[i:i + notes_per_chunk]), dim=False, pedal=pedal)[:max_len]
              for i in range(0, len(score.notes), notes_per_chunk)]
    for ids in chunks:
        ids[-1] = EOS_ID
    return chunks


def random_slice(src, rng, min_notes=100, max_notes=650):
    """A random contiguous slice of min..max notes (a contrastive view, paper §3.3; official
    ContrastiveDataset.get_slice in aria/training/contrastive_finetune.py)."""
    score = load_midi(src)
    n = len(score.notes)
    length = rng.randint(min_notes, max_notes)
    start = rng.randint(0, n - min_notes) if n > min_notes else 0
    return score.with_notes(score.notes[start:start + length])


# -----------------------------------------------------------------------------
# Detokenization (official AbsTokenizer._detokenize_midi_dict): ids -> notes in ms -> MIDI, 1 tick = 1 ms

def _events(ids, k=0):
    """Walk ids[k:] (ints in range): (time_ms, token, dur_ms) for a note, (time_ms, token, None) for a
    drum hit or pedal change, (None, token, None) for any other token. <U> + onset, no dur, is a drum
    outside 35..81: the official augmentation, working on tokens, keeps it as a drum hit, as we do."""
    n, cls_of = len(ids), _CLASS
    base = 0
    while k < n:
        i = ids[k]
        cls = cls_of[i]
        if cls == NOTE and k + 2 < n and cls_of[ids[k + 1]] == ONSET and cls_of[ids[k + 2]] == DUR:
            yield base + (ids[k + 1] - ONSET_START) * TIME_STEP_MS, i, (ids[k + 2] - DUR_START) * TIME_STEP_MS
            k += 3
        elif (cls == DRUM or cls == PEDAL or (i == UNK_ID and (k + 2 >= n or cls_of[ids[k + 2]] != DUR))) \
                and k + 1 < n and cls_of[ids[k + 1]] == ONSET:
            yield base + (ids[k + 1] - ONSET_START) * TIME_STEP_MS, i, None
            k += 2
        else:
            if i == SEG_ID:
                base += SEGMENT_MS
            yield None, i, None
            k += 1


def detokenize_notes(ids, pedals=False):
    """ids (either mode) -> (notes, channel_programs); notes are (start_ms, end_ms, pitch, velocity,
    channel). Notes of an instrument without a prefix are dropped, as officially. pedals=True adds
    the pedal tokens' changes [(time_ms, on)] (written on channel 0, as officially) as a third item."""
    ids = [i if 0 <= i < PEDAL_VOCAB_SIZE else UNK_ID for i in map(int, ids)]
    channel_of = {}  # instrument prefixes before the first event: channels 0, 1, ... skipping 9 (drums)
    for i in ids:
        if TOKEN_CLASS[i] not in (SPECIAL, PREFIX):
            break
        tok = VOCAB[i]
        if TOKEN_CLASS[i] == PREFIX and tok[1] == "instrument" and tok[2] not in channel_of:
            n = sum(inst != "drum" for inst in channel_of)
            channel_of[tok[2]] = DRUM_CHANNEL if tok[2] == "drum" else n + (n >= DRUM_CHANNEL)
    programs = {ch: 0 if inst == "drum" else INSTRUMENT_PROGRAMS[inst] for inst, ch in channel_of.items()}
    notes, changes = [], []
    for start, i, dur in _events(ids):
        if dur is not None and VOCAB[i][0] in channel_of:  # VOCAB[i]: (instrument, pitch, velocity)
            notes.append((start, start + dur, VOCAB[i][1], VOCAB[i][2], channel_of[VOCAB[i][0]]))
        elif start is None:
            continue
        elif i >= PED_ON_ID:
            changes.append((start, int(i == PED_ON_ID)))
        elif _CLASS[i] == DRUM and "drum" in channel_of:
            notes.append((start, start + TIME_STEP_MS, VOCAB[i][1], DRUM_VELOCITY, DRUM_CHANNEL))
    return (notes, programs, changes) if pedals else (notes, programs)


def notes_to_midi(notes, programs, pedals=()):
    """Notes in ms (and pedal changes (ms, on)) -> type-0 mido.MidiFile, 1 tick = 1 ms (500 tpb, 120 bpm)."""
    # MIDI can't overlap a pitch on a channel: a note struck again is cut short there (one cut to
    # zero length is still written, as officially: it reparses as a re-strike)
    notes = sorted(notes, key=lambda n: (n[4], n[2], n[0], n[1]))  # by channel, pitch, time
    for k in range(1, len(notes)):
        prev, cur = notes[k - 1], notes[k]
        if prev[4] == cur[4] and prev[2] == cur[2] and prev[1] > cur[0]:
            notes[k - 1] = (prev[0], cur[0]) + prev[2:]
    # (tick, order, channel, pitch or 64, velocity or CC value): at equal ticks note-offs, note-ons, pedal
    events = [(t, 2, 0, 64, 127 * on) for t, on in pedals]
    for start, end, pitch, vel, ch in notes:
        events += [(start, 1, ch, pitch, vel), (end, 0, ch, pitch, 0)]
    events.sort(key=lambda e: (e[0], e[1]))
    # tempo and programs first: the official dict_to_midi (midi.py) puts the program after tick-0 notes
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=DEFAULT_TEMPO, time=0)])
    track += [mido.Message("program_change", channel=ch, program=p, time=0)
              for ch, p in sorted(programs.items()) if ch != DRUM_CHANNEL]
    now = 0
    for tick, order, ch, a, b in events:
        track.append(mido.Message("note_on", channel=ch, note=a, velocity=b, time=tick - now) if order < 2
                     else mido.Message("control_change", channel=ch, control=a, value=b, time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return mido.MidiFile(type=0, ticks_per_beat=500, tracks=[track])


def detokenize(ids):
    """ids (either mode) -> mido.MidiFile (official AbsTokenizer.detokenize, then MidiDict.to_midi),
    pedal tokens as CC64 changes on channel 0. Incomplete events and unknown ids are skipped."""
    return notes_to_midi(*detokenize_notes(ids, pedals=True))


# -----------------------------------------------------------------------------
# Augmentation on ids (paper §3.2: pitch ±5, velocity ±10, tempo ±20%; official AbsTokenizer.export_*)

def pitch_shift(ids, k):
    """Transpose notes by k semitones; notes leaving 0..127 become <U> (their onset/dur stay)."""
    ids = np.array(ids, dtype=np.int64)
    mask = TOKEN_CLASS[ids] == NOTE
    pitch = ((ids - NOTE_START) % NOTES_PER_INSTRUMENT) // 13
    ok = (pitch + k >= 0) & (pitch + k <= 127)
    ids[mask & ok] += 13 * k
    ids[mask & ~ok] = UNK_ID
    return ids


def velocity_shift(ids, step):
    """Move note velocities by step bins (10 each), clamped to 10..120."""
    ids = np.array(ids, dtype=np.int64)
    mask = TOKEN_CLASS[ids] == NOTE
    v = (ids - NOTE_START) % 13
    ids[mask] += np.clip(v[mask] + step, 1, 12) - v[mask]
    return ids


def tempo_scale(ids, factor, rng=None):
    """Stretch time by `factor`, re-segmenting across <T> (official AbsTokenizer.export_tempo_aug).
    Events are regrouped by time; with an rng, events sharing an onset are shuffled (mixup). <U>/<P>
    are dropped, <E> moves to the end, <D> follows the events at its time; the length may change."""
    def q10(ms):  # to the 10 ms grid with Python's round, as the official _quantize_time
        return round(ms / TIME_STEP_MS) * TIME_STEP_MS
    ids = [int(i) for i in ids]
    k = 0
    while k < len(ids) and (ids[k] == BOS_ID or TOKEN_CLASS[ids[k]] == PREFIX):
        k += 1
    out = ids[:k]
    groups = {}   # source time -> its events (token, dur_ms or None); the onset is replaced later
    dims = {}     # source time (-1: before any event) -> count of <D> re-emitted after its events
    last_time, has_eos = -1, False
    for t, i, dur in _events(ids, k):
        if t is not None:
            groups.setdefault(t, []).append((i, dur))
            last_time = t
        elif i == EOS_ID:
            has_eos = True
        elif i == DIM_ID:
            dims[last_time] = dims.get(last_time, 0) + 1
        # anything else (<U>, <P>, stray onset/dur, malformed events) is dropped
    out.extend([DIM_ID] * dims.pop(-1, 0))
    segment = 0
    for t in sorted(groups):
        events = groups[t]
        if rng is not None:
            rng.shuffle(events)
        tt = q10(t * factor)
        seg = tt // SEGMENT_MS
        if seg > segment:
            out.extend([SEG_ID] * (seg - segment))
            segment = seg
        onset = onset_id(tt % SEGMENT_MS)
        for tok, dur in events:
            out += (tok, onset)
            if dur is not None:
                out.append(dur_id(min(max(q10(dur * factor), TIME_STEP_MS), MAX_DUR_MS)))
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
    """Training augmentation (official AbsTokenizer.export_data_aug): tempo, then pitch, then velocity,
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
    """One line per event (note, drum or pedal with its onset and dur), one per other token."""
    lines, in_event = [], False
    for i in ids:
        cls = TOKEN_CLASS[i]
        if cls in (ONSET, DUR) and in_event:
            lines[-1] += " " + token_str(i)
        else:
            lines.append(token_str(i))
            in_event = cls in (NOTE, DRUM, PEDAL, ONSET, DUR)
    return "\n".join(lines)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Tokenize MIDI files with the Aria tokenizer.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("files", nargs="+", help="MIDI files")
    ap.add_argument("--json", action="store_true",
                    help='one JSON line per file: {"file", "ids"} or {"file", "error"}')
    ap.add_argument("--no-dim", dest="dim", action="store_false", help="leave out the <D> token")
    ap.add_argument("--pedal", action="store_true", help="pedal mode (official include_pedal; piano only)")
    args = ap.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            ids = tokenize(path, dim=args.dim, pedal=args.pedal)
            print(json.dumps({"file": path, "ids": ids}) if args.json
                  else f"# {path}: {len(ids)} tokens\n{_readable(ids)}", flush=True)
        except TokenizerError as e:
            failed += 1
            print(json.dumps({"file": path, "error": str(e)}) if args.json else f"error: {e}",
                  file=sys.stdout if args.json else sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, the flush at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
