"""
MIDI in and out for sample.py (--stream, --port) and live.py (the duet): the ports (their errors in
one line), a MIDI file played as a pianist, a clock (the wall clock, or a simulated one for tests),
a scheduler that plays notes at their times, and the notes a stream of tokens completes.
"""
import heapq
import json
import math
import os
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


def _backend_call(fn, backend):
    """fn(the backend: mido's default, or the one named), its failures as one line. The C libraries
    under python-rtmidi (ALSA, JACK) print their own lines on fd 2 when they cannot start: not here."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        return fn(mido.Backend(backend) if backend else mido)
    except ImportError as e:
        if backend and "rtmidi" not in str(e):
            raise LiveError(f"--backend {backend}: {e}") from None
        raise LiveError("MIDI ports need a backend: pip install python-rtmidi") from None
    except ValueError as e:  # an unknown rtmidi API
        raise LiveError(f"--backend {backend}: {e}") from None
    except (OSError, RuntimeError) as e:  # rtmidi's SystemError is an OSError
        hint = "check the port, or pick another MIDI API with --backend"
        if "ALSA" in str(e):
            hint = ("no ALSA sequencer here (/dev/snd/seq; a container has none): load snd-seq, or start "
                    "JACK (jackd -d dummy) and pass --backend mido.backends.rtmidi/UNIX_JACK")
        elif "JACK" in str(e):
            hint = "the JACK server is not running: start it (jackd -d dummy), or pick another --backend"
        raise LiveError(f"python-rtmidi cannot open MIDI ({str(e).strip()}); {hint}") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def port_names(kind, backend=None):
    return _backend_call(lambda b: b.get_input_names() if kind == "input" else b.get_output_names(), backend)


def open_port(name, kind, backend=None, callback=None):
    """A mido port by name; an input calls callback(msg) from the backend's thread as each message
    arrives."""
    names = port_names(kind, backend)
    if name not in names:
        raise LiveError(f"no MIDI {kind} named {name!r}; {kind}s: {', '.join(map(repr, names)) or 'none'}")
    return _backend_call(lambda b: b.open_input(name, callback=callback) if kind == "input"
                         else b.open_output(name), backend)


class JsonOut:
    """`--out -`: one JSON line per message: who played it (aria or pianist), its due and actual
    send time (s since the start)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def send(self, msg, due=None, sent=None, who=None):
        self.stream.write(json.dumps({**msg.dict(), "who": who, "due": due, "sent": sent}) + "\n")
        self.stream.flush()


class FileHuman:
    """A MIDI file as the pianist: its messages reach deliver(msg, ms) at their times (the time is
    the stamp), from a thread or a simulated clock's ticks, as a port's reach its callback. With
    `part` s it plays that much, releases its keys and pedal and waits: resume() plays its next
    part from then on."""

    def __init__(self, path, part=None):
        try:
            t, self.events = 0.0, []
            for msg in mido.MidiFile(path):  # all tracks merged, delta times in seconds, tempo applied
                t += msg.time
                if msg.type in ("note_on", "note_off", "control_change"):
                    self.events.append((t * 1000, msg))
        except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
            raise LiveError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from None
        self.part, self.n = part and part * 1000, 1  # the part playing
        self.k, self.offset = 0, 0.0  # the next message; ms from the file's time to the clock's
        self.held, self.pedal = set(), set()  # keys and pedals down
        self.part_end, self.finished = None, False
        self.closed, self.lock = False, threading.Lock()

    def start(self, clock, deliver):
        self.clock, self.deliver = clock, deliver
        if isinstance(clock, SimClock):
            clock.ticks.insert(0, self.pump)
        else:
            threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self):
        while not self.closed and not self.finished:
            self.pump()
            due = self.events[self.k][0] + self.offset if self.k < len(self.events) else math.inf
            self.clock.sleep(0.01 if self.part_end is not None else min(0.01, (due - self.clock.ms()) / 1000))

    def _send(self, msg, ms):
        key = (getattr(msg, "channel", 0), getattr(msg, "note", None))
        if msg.type in ("note_on", "note_off") and not (msg.type == "note_on" and msg.velocity):
            if key not in self.held:  # a note cut at the end of the last part
                return
            self.held.discard(key)
        elif msg.type == "note_on":
            self.held.add(key)
        elif msg.control == 64:
            (self.pedal.add if msg.value >= 64 else self.pedal.discard)(msg.channel)
        self.deliver(msg, ms)

    def pump(self):
        with self.lock:
            ev, now = self.events, self.clock.ms()
            end = self.part * self.n if self.part else math.inf
            while self.part_end is None and self.k < len(ev) and ev[self.k][0] < end \
                    and ev[self.k][0] + self.offset <= now:
                self._send(ev[self.k][1], ev[self.k][0] + self.offset)
                self.k += 1
            done = self.k == len(ev)  # then the part ends with the file's last message
            stop = (min(end, ev[-1][0] if ev else 0.0) if done else end) + self.offset
            if self.part_end is None and not self.finished and (done or ev[self.k][0] >= end) and now >= stop:
                for ch, note in sorted(self.held):  # the pianist stops: keys up, pedal up
                    self._send(mido.Message("note_off", channel=ch, note=note), stop)
                for ch in sorted(self.pedal):
                    self._send(mido.Message("control_change", channel=ch, control=64, value=0), stop)
                self.finished = done
                self.part_end = stop if self.part else None

    def resume(self, ms):
        with self.lock:
            self.offset, self.part_end = ms - self.part * self.n, None
            self.n += 1

    def close(self):
        self.closed = True


# -----------------------------------------------------------------------------
# Clocks


class Clock:
    """Seconds on the wall clock (perf_counter); ms() counts from the start."""

    def __init__(self):
        self.start = time.perf_counter()

    def now(self):
        return time.perf_counter()

    def ms(self, t=None):
        return ((self.now() if t is None else t) - self.start) * 1000

    def sleep(self, s):
        time.sleep(max(s, 0.0))


class SimClock(Clock):
    """Simulated time for tests: sleep() moves it on at once, then runs `ticks` (the player, a
    file's messages); computing takes no time."""

    def __init__(self):
        self.start, self.t = 0.0, 0.0
        self.ticks = []

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += max(s, 0.0)
        for tick in self.ticks:
            tick()


# -----------------------------------------------------------------------------
# The player: timed messages on the output


class Player:
    """Aria's notes on the output at their times (clock.start + ms / 1000 + the turn's shift),
    note-offs by the notes' durations, a pitch struck again released first; the pianist's messages
    (echo) at once. A turn's first note sets its shift (her music starts when it can sound); a
    later note more than LATE_MS behind counts as late and moves the rest of the turn by its delay.
    Her releases never cut the pianist: while they hold a pitch (on any channel: a digital piano
    sounds its keys before any echo) or their pedal, her note-off of that pitch or her pedal-up
    waits for their release. Thread-safe: a scheduler thread plays, or a SimClock's ticks."""

    def __init__(self, out, clock, on_send=None):
        self.out, self.clock = out, clock
        self.on_send = on_send  # on_send(who, msg, ms): a recording
        self.heap, self.seq = [], 0
        self.cv = threading.Condition()
        self.sounding = {}  # (channel, pitch) -> when its latest note-on of Aria's was sent
        self.pedal = set()  # channels where Aria's pedal is down
        self.held, self.human_pedal = set(), False  # (channel, pitch) the pianist holds; their pedal
        self.waiting, self.pedal_waiting = set(), set()  # Aria's releases held back for the pianist
        self.keys = {}  # (channel, pitch) -> on, for every note message that reached the output
        self.stats, self.error = dict(notes=0, late=0), None
        self.closed = False
        self.begin_turn()
        if isinstance(clock, SimClock):
            clock.ticks.append(self._pump)
        else:
            threading.Thread(target=self._run, daemon=True).start()

    def begin_turn(self):
        with self.cv:
            self.shift, self.playing = 0.0, True
            self.turn = dict(notes=0, late=0, first_sent=None, first_ready=None, last_start=0.0, last_end=0.0)

    def _send(self, msg, due, who="aria"):
        sent = self.clock.now()
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
        if self.on_send:
            self.on_send(who, msg, self.clock.ms(sent))
        return sent

    def note(self, start_ms, end_ms, pitch, velocity, channel=0):
        """Schedule one of Aria's notes (ms on the clock); -> its start with the shift (ms), or
        None once the turn was stopped."""
        with self.cv:
            if not self.playing:
                return None
            now, turn = self.clock.now(), self.turn
            first = turn["first_ready"] is None
            asked = self.clock.start + start_ms / 1000 + self.shift
            if first or asked < now - LATE_MS / 1000:  # (a chord's last notes, a few ms behind, do not)
                self.shift += max(0.0, now - asked)
            asked = max(asked, now) if first else asked  # lateness counts from here
            due = self.clock.start + start_ms / 1000 + self.shift
            turn["first_ready"] = turn["first_ready"] or now
            turn["last_start"] = max(turn["last_start"], due)
            turn["last_end"] = max(turn["last_end"], due + (end_ms - start_ms) / 1000)
            self._push(due, ("on", channel, pitch, velocity, (end_ms - start_ms) / 1000, asked))
            return start_ms + self.shift * 1000

    def pedal_change(self, ms, on, channel=0):
        """-> its time with the shift (ms), or None once the turn was stopped."""
        with self.cv:
            if not self.playing:
                return None
            due = max(self.clock.now(), self.clock.start + ms / 1000 + self.shift)
            self._push(due, ("cc", channel, 64, 127 * on))
            return ms + self.shift * 1000

    def end_turn(self, channel=0):
        """Aria's sustain lifted when her last note ends, however her turn ended; -> that time (ms)."""
        with self.cv:
            due = max(self.turn["last_end"], self.clock.now())
            self._push(due, ("cc", channel, 64, 0))
            return self.clock.ms(due)

    def human(self, msg, echo=False):
        """A message of the pianist: what they hold is kept (Aria's releases wait for it), and with
        echo it goes out at once."""
        with self.cv:
            if msg.type in ("note_on", "note_off"):
                on = msg.type == "note_on" and msg.velocity
                (self.held.add if on else self.held.discard)((msg.channel, msg.note))
            elif msg.type == "control_change" and msg.control == 64:
                self.human_pedal = msg.value >= 64
            if echo:
                self._send(msg, self.clock.now(), "pianist")
            for ch, pitch in [k for k in self.waiting if not self._holds(k[1])]:
                self.waiting.discard((ch, pitch))
                if self.sounding.pop((ch, pitch), None) is not None:
                    self._send(mido.Message("note_off", channel=ch, note=pitch), self.clock.now())
            while self.pedal_waiting and not self.human_pedal:
                ch = self.pedal_waiting.pop()
                self._send(mido.Message("control_change", channel=ch, control=64, value=0), self.clock.now())

    def _holds(self, pitch):
        return any(p == pitch for _, p in self.held)

    def _push(self, due, item):
        heapq.heappush(self.heap, (due, self.seq, item))
        self.seq += 1
        self.cv.notify()

    def _pump(self):
        with self.cv:
            while self.heap and self.heap[0][0] <= self.clock.now():
                due, item = heapq.heappop(self.heap)[::2]
                self._play(due, item)

    def _run(self):
        with self.cv:
            while not self.closed:
                now = self.clock.now()
                if not self.heap or self.heap[0][0] > now:
                    self.cv.wait(None if not self.heap else self.heap[0][0] - now)
                    continue
                due, item = heapq.heappop(self.heap)[::2]
                self._play(due, item)

    def _play(self, due, item):
        kind, ch = item[:2]
        a, b = item[2:4]
        if kind == "on":
            if (ch, a) in self.sounding and not self._holds(a):  # struck again while sounding: released first
                self._send(mido.Message("note_off", channel=ch, note=a), due)
            sent = self._send(mido.Message("note_on", channel=ch, note=a, velocity=b), due)
            self.sounding[ch, a] = sent
            late = (sent - item[5]) * 1000 > LATE_MS
            for stats in (self.stats, self.turn):
                stats["notes"] += 1
                stats["late"] += late
            self.turn["first_sent"] = self.turn["first_sent"] or sent
            self._push(sent + item[4], ("off", ch, a, sent))
        elif kind == "off":
            if self.sounding.get((ch, a)) == b:  # not struck again since
                self._release(ch, a, due)
        elif b == 0 and self.human_pedal:
            self.pedal_waiting.add(ch)
            self.pedal.discard(ch)
        else:
            (self.pedal.add if b else self.pedal.discard)(ch)
            self._send(mido.Message("control_change", channel=ch, control=a, value=b), due)

    def _release(self, ch, pitch, due):
        if self._holds(pitch):
            self.waiting.add((ch, pitch))
        else:
            del self.sounding[ch, pitch]
            self._send(mido.Message("note_off", channel=ch, note=pitch), due)

    def busy(self):
        """Aria still has notes to start or release."""
        with self.cv:
            return bool(self.heap or set(self.sounding) - self.waiting)

    def stop(self):
        """Aria stops now (the pianist took the lead, or the end): nothing more queued or taken this
        turn, her notes released and her pedal lifted (the pianist's held back)."""
        with self.cv:
            self.playing = False
            self.heap.clear()
            for ch, pitch in [k for k in self.sounding if k not in self.waiting]:
                self._release(ch, pitch, self.clock.now())
            for ch in list(self.pedal):
                self._play(self.clock.now(), ("cc", ch, 64, 0))

    def reset(self, channels):
        """All notes off and the pedal up on these channels (before the duet starts)."""
        with self.cv:
            for ch in channels:
                for control in (123, 64):
                    msg = mido.Message("control_change", channel=ch, control=control, value=0)
                    self._send(msg, self.clock.now())

    def close(self):
        """Silence everything: Aria's notes (those held back too), any echoed note still held, the
        pedal on every channel used; -> stuck: the notes the output was left holding (its note-ons
        without a note-off)."""
        self.stop()
        with self.cv:
            self.held.clear()
            self.human_pedal = False
            now = self.clock.now()
            for ch, pitch in list(self.waiting):
                self._send(mido.Message("note_off", channel=ch, note=pitch), now)
            for (ch, pitch), on in list(self.keys.items()):
                if on:
                    self._send(mido.Message("note_off", channel=ch, note=pitch), now, "pianist")
            for ch in sorted({ch for ch, _ in self.keys} | self.pedal_waiting | {0}):
                self._send(mido.Message("control_change", channel=ch, control=64, value=0), now)
            self.sounding.clear()
            self.waiting.clear()
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
                notes, changes = T.detokenize_notes(self.head + self.event, pedals=True)[::2]
                self.event = []
                return ([(s + self.base, e + self.base, *n) for s, e, *n in notes],
                        [(t + self.base, on) for t, on in changes])
        else:
            self.event = []
        return [], []


def stream_notes(prompt, rows, json_lines=False, port=None, last_ms=0):
    """sample.py --stream / --port: an on_step for sample.generate that prints every row's notes
    and pedal changes as JSON lines the moment they are decoded, and plays the first row on a MIDI
    output in real time, the prompt's last onset (last_ms) at the first new token; -> (on_step, finish),
    finish() waits for the last notes, releases everything and returns an error or None."""
    streams = [NoteStream(prompt) for _ in range(rows)]
    player = Player(open_port(port, "output"), Clock()) if port else None
    origin = -last_ms

    def on_step(i, toks):
        if player and i == 0:  # the music starts with the first new token, not before the prefill
            player.clock.start = time.perf_counter()
        for row, (stream, tok) in enumerate(zip(streams, toks), 1):
            notes, changes = stream.feed(tok)
            for n in notes:
                if json_lines:
                    print(json.dumps(dict(row=row, start_ms=n[0], end_ms=n[1], pitch=n[2], velocity=n[3],
                                          channel=n[4])), flush=True)
                if player and row == 1:
                    player.note(n[0] + origin, n[1] + origin, *n[2:])
            for t, on in changes:
                if json_lines:
                    print(json.dumps(dict(row=row, pedal_ms=t, on=on)), flush=True)
                if player and row == 1:
                    player.pedal_change(t + origin, on)
        return bool(player and player.error)

    def finish():
        if player is None:
            return None
        while player.busy() and not player.error:
            time.sleep(0.01)
        stuck = player.close()
        print(f"played {player.stats['notes']} notes on {port}: {player.stats['late']} late "
              f"(timeline moved {player.shift:.2f} s), {stuck} stuck",
              file=sys.stderr if json_lines else sys.stdout)
        return player.error
    return on_step, finish
