"""
Timed MIDI output, shared by sample.py (--stream, --port) and live.py (the duet): the MIDI ports,
a scheduler thread that plays notes at their times on the wall clock, and the notes a stream of
tokens completes, one token at a time.
"""
import heapq
import json
import sys
import threading
import time

import mido

import tokenizer as T

LATE_MS = 50  # a note sent later than this after its time counts as late

class LiveError(Exception):
    """One line for the user: a missing backend, an unknown port, a vanished port."""


# -----------------------------------------------------------------------------
# MIDI in and out


def port_names(kind):
    try:
        return mido.get_input_names() if kind == "input" else mido.get_output_names()
    except ImportError:
        raise LiveError("MIDI ports need a backend: pip install python-rtmidi") from None


def open_port(name, kind):
    names = port_names(kind)
    if name not in names:
        raise LiveError(f"no MIDI {kind} named {name!r}; {kind}s: {', '.join(map(repr, names)) or 'none'}")
    return mido.open_input(name) if kind == "input" else mido.open_output(name)


class JsonOut:
    """`--out -`: one JSON line per message: who played it (aria or pianist), its due and actual
    send time (s since the start)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def send(self, msg, due=None, sent=None, who=None):
        self.stream.write(json.dumps({**msg.dict(), "who": who, "due": due, "sent": sent}) + "\n")
        self.stream.flush()


# -----------------------------------------------------------------------------
# The player: timed messages on the output from a scheduler thread


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def ms(self, wall=None):
        return ((wall or time.perf_counter()) - self.start) * 1000


class Player:
    """Aria's notes on the output at their wall-clock times (clock.start + ms / 1000 + shift). Note-
    offs follow their note-on by the note's duration; a pitch struck again while sounding is
    released first. The pianist's notes (file mode, --echo) go out at once. Thread-safe."""

    def __init__(self, out, clock):
        self.out, self.clock, self.shift = out, clock, 0.0
        self.heap, self.seq, self.cv = [], 0, threading.Condition()
        self.sounding = {}  # (channel, pitch) -> wall time its latest note-on was sent (Aria's notes)
        self.pedal = set()  # channels where Aria holds the pedal
        self.human = set()  # (channel, pitch) the pianist's notes echoed and not yet released
        self.keys = {}  # (channel, pitch) -> on, for every note message that reached the output
        self.stats = dict(notes=0, late=0, first_sent=None, first_ready=None, last_start=0.0)
        self.error, self.closed = None, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, msg, due, who="aria"):
        sent = time.perf_counter()
        try:
            if isinstance(self.out, JsonOut):
                self.out.send(msg, round(due - self.clock.start, 4), round(sent - self.clock.start, 4), who)
            else:
                self.out.send(msg)
        except Exception as e:  # a vanished port, a closed pipe
            self.error = self.error or f"the output stopped taking messages ({type(e).__name__}: {e})"
            return sent
        if msg.type in ("note_on", "note_off"):
            self.keys[msg.channel, msg.note] = msg.type == "note_on" and msg.velocity > 0
        return sent

    def note(self, start_ms, end_ms, pitch, velocity, channel=0):
        """Schedule one of Aria's notes (music ms); late: start now, move the timeline."""
        with self.cv:
            now = time.perf_counter()
            due = asked = self.clock.start + start_ms / 1000 + self.shift
            if due < now - LATE_MS / 1000:  # late: the timeline moves (a chord's last notes, a few ms behind, do not)
                self.shift += now - due
            due = max(due, now)
            self.stats["last_start"] = max(self.stats["last_start"], due)
            self.stats["first_ready"] = self.stats["first_ready"] or now
            self._push(due, ("on", channel, pitch, velocity, (end_ms - start_ms) / 1000, asked))
            self.cv.notify()

    def pedal_change(self, ms, on, channel=0):
        with self.cv:
            self._push(max(time.perf_counter(), self.clock.start + ms / 1000 + self.shift),
                       ("cc", channel, 64, 127 if on else 0))
            self.cv.notify()

    def echo(self, msg):
        """A message of the pianist, out now (file mode or --echo)."""
        with self.cv:
            if msg.type in ("note_on", "note_off"):
                key = (msg.channel, msg.note)
                (self.human.add if msg.type == "note_on" and msg.velocity else self.human.discard)(key)
            self._send(msg, time.perf_counter(), "pianist")

    def _push(self, due, item):
        heapq.heappush(self.heap, (due, self.seq, item))
        self.seq += 1

    def _run(self):
        with self.cv:
            while not self.closed:
                now = time.perf_counter()
                if not self.heap or self.heap[0][0] > now:
                    self.cv.wait(None if not self.heap else self.heap[0][0] - now)
                    continue
                due, _, item = heapq.heappop(self.heap)
                self._play(due, item)

    def _play(self, due, item):
        kind, ch, a, b = item[:4]
        if kind == "on":
            if (ch, a) in self.sounding:  # struck again while sounding: release it first
                self._send(mido.Message("note_off", channel=ch, note=a), due)
            sent = self._send(mido.Message("note_on", channel=ch, note=a, velocity=b), due)
            self.sounding[ch, a] = sent
            self.stats["notes"] += 1
            self.stats["first_sent"] = self.stats["first_sent"] or sent
            self.stats["late"] += (sent - item[5]) * 1000 > LATE_MS
            self._push(sent + item[4], ("off", ch, a, sent))
        elif kind == "off":
            if self.sounding.get((ch, a)) == b:  # not re-struck since
                del self.sounding[ch, a]
                self._send(mido.Message("note_off", channel=ch, note=a), due)
        else:
            (self.pedal.add if b else self.pedal.discard)(ch)
            self._send(mido.Message("control_change", channel=ch, control=a, value=b), due)

    def busy(self):
        """Aria still has notes to start or release."""
        with self.cv:
            return bool(self.heap or self.sounding)

    def silence(self):
        """Stop Aria now: nothing more queued, every note of hers released, her pedal lifted."""
        with self.cv:
            self.heap.clear()
            now = time.perf_counter()
            for ch, pitch in list(self.sounding):
                self._send(mido.Message("note_off", channel=ch, note=pitch), now)
            for ch in self.pedal:
                self._send(mido.Message("control_change", channel=ch, control=64, value=0), now)
            self.sounding.clear()
            self.pedal.clear()

    def close(self):
        """Silence everything: Aria's notes, any echoed note still held, the pedal on every channel
        used; -> stuck: the notes the output was left holding (its note-ons without a note-off)."""
        self.silence()
        with self.cv:
            now = time.perf_counter()
            for ch, pitch in list(self.human):
                self._send(mido.Message("note_off", channel=ch, note=pitch), now, "pianist")
            for ch in sorted({ch for ch, _ in self.keys} | {0}):
                self._send(mido.Message("control_change", channel=ch, control=64, value=0), now)
            self.closed = True
            self.cv.notify()
        return sum(self.keys.values())


class NoteStream:
    """One row's notes and pedal changes as its tokens arrive (sample.py --stream/--port, the duet):
    feed(token) -> (notes, pedal changes) the token completes, as detokenize_notes gives them for
    the whole row: (start_ms, end_ms, pitch, velocity, channel) and (ms, on)."""

    def __init__(self, prompt):
        bos = prompt.index(T.BOS_ID)
        self.head, self.event = prompt[:bos + 1], []  # the prefix names the channels
        self.base = T.SEGMENT_MS * prompt[bos + 1:].count(T.SEG_ID)

    def feed(self, tok):
        cls = T.TOKEN_CLASS[tok] if tok < len(T.TOKEN_CLASS) else T.SPECIAL
        if tok == T.SEG_ID:
            self.base += T.SEGMENT_MS
        if cls in (T.NOTE, T.DRUM, T.PEDAL):
            self.event = [tok]
        elif cls in (T.ONSET, T.DUR) and self.event:
            self.event.append(tok)
            if cls == T.DUR or T.TOKEN_CLASS[self.event[0]] != T.NOTE:
                notes, _, changes = T.detokenize_notes(self.head + self.event, pedals=True)
                self.event = []
                return ([(s + self.base, e + self.base, *n) for s, e, *n in notes],
                        [(t + self.base, on) for t, on in changes])
        else:
            self.event = []
        return [], []


