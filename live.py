"""
Play a duet with Aria in real time: a pianist plays into a MIDI input; when they hand over (a
pedal press, a pause, or a time in file mode) Aria continues on a MIDI output, with the sustain
pedal where the checkpoint speaks it, until the pianist plays again; turn after turn, for an hour
if they like, the whole duet kept in a MIDI file (--save).

    python live.py --list                                          # MIDI ports (needs python-rtmidi)
    python live.py --in "Digital Piano" --out "Digital Piano" --channel 1 --ckpt aria-medium-gen \\
        --quantize int8 --save duet.mid
    python live.py --in song.mid --takeover 30 --turns 8 --seconds 8 --out -   # a file as the pianist
    python live.py --backend mido.backends.rtmidi/UNIX_JACK --list  # JACK's ports (no ALSA sequencer)

After the official demo (EleutherAI/aria demo/demo_mlx.py), in plain mido:
- listen: messages are stamped as they arrive (in mido's callback thread; a file's at their
  times). Every --prefill_every s the KV cache takes what it lacks, a chunk at a time: ended notes
  are tokenized once and kept; held ones wait for the takeover. CC64 counts when it crosses 64.
- the window: the model reads min(max_seq_len, --context) tokens, less what one turn may add
  (--seconds at 1.5x the performance's token rate, at most --length): >= 500, checked at start.
  When the performance outgrows it, ~40% goes at once at a <T> boundary; the cache is rebuilt only
  then, in the background while the pianist plays.
- takeover: a control change (--takeover_cc; 67, the soft pedal, as the official demo), no key
  down for --pause s, or the end of each --takeover s of a file; held keys and pedal end there in
  the context. Her first note comes as soon as it can sound, her leading rest at most FIRST_REST_MS
  (the official demo penalises <T> and bans <E>/<D> as her first tokens).
- play: a scheduler thread sends each note at its time; decoding runs at most --lookahead s ahead.
  A turn's first note sets its timeline; a later note over 50 ms late counts as late and moves the
  rest of the turn; the next turn starts on time, and the context keeps where her notes sounded. A
  turn ends after --seconds of music, at its token allowance, or when the pianist plays (her notes
  released at once, but never a pitch they hold: a digital piano sounds its keys before any echo).
  <E> and <D> are not sampled (official demo; --may_end allows them). Her pedal is lifted at the
  end of each of her turns.
- sampling: temperature 0.85, min-p 0.05, as the official demo's README runs it: an answer that
  stays closer to what was just played than the offline defaults (0.98, 0.035).
- exit (Ctrl-C, an error, a vanished port): every note Aria or a file started is released, the
  pedal lifted and --save written (also every SAVE_EVERY_S s and after each turn; atomically).
The last line of `--out -` is a summary; per_turn holds, for each turn, first_note_s (takeover ->
her first note sent, her chosen rest included), notes, late, context_tokens, context_s (music the
model saw), cache_rebuilds, prefill_behind and prefill_s (what the takeover still had to prefill:
whether the prefill kept up with the pianist) and rss_mb.
"""
import argparse
import bisect
import collections
import json
import math
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

import grammar as G
import model as M
import player as P
import sample as S
import tokenizer as T

FIRST_REST_MS = 150      # her first onset at most this after the earliest it can sound
FIRST_LEAD_MS = 300      # the lead she gets to decode her first 16 notes in (an opening flourish), at most
PRIOR_TOKENS_PER_S = 30  # the token rate before the performance shows its own (sample.py's prior)
MIN_WINDOW = 500         # tokens of the performance the model reads at least
SLACK = 8                # room for the <T>s that bring her first onset up to the takeover
KEEP = 0.65              # a cut keeps about this much of the window (a <T> boundary: up to 5 s less)
PREFILL_SLICE_S = 0.1    # a prefill chunk takes about this long: a takeover waits for one at most
SAVE_EVERY_S = 5         # --save rewrites the file this often: a crash loses at most this much
SEG = T.SEGMENT_MS


class Recording:
    """The whole duet as a MIDI file (--save): the pianist's messages as they arrived and Aria's
    as they were sent, on two tracks at 1 tick = 1 ms, encoded as they come, so rewriting the file
    (atomically, notes still sounding closed at its end) costs little however long the session."""

    def __init__(self, path):
        self.path, self.lock = path, threading.Lock()
        tempo = bytes([0, 0xFF, 0x51, 3, 0x07, 0xA1, 0x20])  # 120 bpm at 500 ticks per beat: 1 tick = 1 ms
        self.tracks = {who: [bytearray(tempo + bytes([0, 0xFF, 3, len(who)]) + who.encode()), 0, set()]
                       for who in ("pianist", "aria")}  # bytes, last tick, notes sounding

    def add(self, who, msg, ms):
        note = msg.type in ("note_on", "note_off")
        if not note and not (msg.type == "control_change" and msg.control == 64):
            return
        with self.lock:
            track = self.tracks[who]
            tick = max(track[1], round(ms))
            delta, n = bytearray([(tick - track[1]) & 0x7F]), (tick - track[1]) >> 7
            while n:  # a variable-length quantity: 7 bits a byte, the high bit on all but the last
                delta.insert(0, 0x80 | n & 0x7F)
                n >>= 7
            track[0] += delta + bytes(msg.bytes())
            track[1] = tick
            if note:
                on = msg.type == "note_on" and msg.velocity
                (track[2].add if on else track[2].discard)((msg.channel, msg.note))

    def save(self):
        with self.lock:
            chunks = b""
            for data, _, sounding in self.tracks.values():
                body = bytes(data) + b"".join(bytes([0, 0x80 | ch, note, 0]) for ch, note in sorted(sounding))
                body += bytes([0, 0xFF, 0x2F, 0])
                chunks += b"MTrk" + struct.pack(">I", len(body)) + body
        M.atomic_write(self.path, lambda f: f.write(b"MThd" + struct.pack(">IHHH", 6, 1, 2, 500) + chunks))


def free_path(path, overwrite):
    """path, or path-2.mid, -3, ... when it exists (unless overwrite)."""
    p, n = Path(path), 1
    while p.exists() and not overwrite:
        n += 1
        p = Path(path).with_stem(f"{Path(path).stem}-{n}")
    return p


# -----------------------------------------------------------------------------
# The performance as tokens


@dataclass(slots=True)
class Ev:
    """One event: a note (pitch, velocity, start and end ms, end None while its key is down; dur:
    Aria's duration token as she chose it, else made from the end and the pedal) or a pedal change
    (pitch None, vel = on). q: its onset on the tokens' grid, in ms from the first note; seq: order."""
    q: int
    seq: int
    start: int
    end: int | None
    pitch: int | None
    vel: int
    dur: int | None = None


class Performance:
    """The events of both players in the window, in onset order, and their tokens: a prompt (no
    <D>, no <E>) whose time 0 is `base` ms, the first note or a whole number of segments later."""

    def __init__(self, pedal_mode):
        self.pedal_mode, self.head = pedal_mode, [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]
        self.events, self.n = [], 0  # n: events so far
        self.origin, self.base = None, None  # ms of the first note; of the window's start
        self.keys = {}  # pitch -> Ev: the pianist's keys down
        self.ped_ms, self.ped_on = [], []  # the context's pedal changes, alternating: for durations
        self.stable, self.marks = [], []  # tokens of events[:len(marks)]; (tokens, <T>s) before each
        self.seg = 0  # <T>s in stable

    def add(self, start, pitch, vel, end=None, dur=None):
        if self.origin is None and pitch is None:
            return None
        if self.origin is None:
            self.origin, self.base = start, start
        rel = start - self.origin
        ev = Ev(rel // SEG * SEG + T.ONSET_Q[rel % SEG], self.n, start, end, pitch, vel, dur)
        self.n += 1
        i = bisect.bisect(self.events, (ev.q, ev.seq), key=lambda e: (e.q, e.seq))
        self.events.insert(i, ev)
        self.invalidate(i)
        if self.n == 1 and self.pedal_mode and self.ped_on[-1:] == [1]:  # the pedal was down before it
            self.add(start, None, 1)
        return ev

    def invalidate(self, i):
        if i < len(self.marks):
            n, self.seg = self.marks[i]
            del self.stable[n:], self.marks[i:]

    def pedal(self, ms, on):
        """A change of the pedal in the context, if it is one."""
        if (self.ped_on[-1] if self.ped_on else 0) != on:
            self.ped_ms.append(ms)
            self.ped_on.append(on)
            if self.pedal_mode:
                self.add(ms, None, on)

    def key_down(self, ms, pitch, vel):
        self.key_up(ms, pitch)
        self.keys[pitch] = self.add(ms, pitch, vel)

    def key_up(self, ms, pitch):
        ev = self.keys.pop(pitch, None)
        if ev is not None:
            ev.end = ms

    def end_keys(self, ms):
        """The takeover: the keys and pedal the pianist holds end here in the context."""
        for pitch in list(self.keys):
            self.key_up(ms, pitch)
        self.pedal(ms, 0)

    def sustained(self, end):
        """When a note released at `end` stops sounding (durations hold the pedal, as the tokenizer
        reads them); None while the pedal holding it is still down."""
        j = bisect.bisect_left(self.ped_ms, end) - 1
        if j < 0 or not self.ped_on[j]:
            return end
        return self.ped_ms[j + 1] if j + 1 < len(self.ped_ms) else None

    def final(self, ev, now):
        """Its tokens will not change: a pedal change, Aria's note, or the pianist's that has ended
        (pedal included) or is 5 s long already (the longest duration token)."""
        return ev.pitch is None or ev.dur is not None or now - ev.start >= T.MAX_DUR_MS or \
            ev.end is not None and self.sustained(ev.end) is not None

    def emit(self, out, ev, now, seg):
        t = ev.q - (self.base - self.origin)
        out += [T.SEG_ID] * (t // SEG - seg)
        onset = T.ONSET_START + t % SEG // T.TIME_STEP_MS
        if ev.pitch is None:
            out += [T.PED_ON_ID if ev.vel else T.PED_OFF_ID, onset]
        else:
            end = now if ev.end is None else self.sustained(ev.end)
            end = now if end is None else end
            dur = ev.dur or T.DUR_START + T.quantize_dur(round(end - ev.start)) // T.TIME_STEP_MS
            out += [T.NOTE_START + ev.pitch * 13 + T.VELOCITY_Q[ev.vel] // 10, onset, dur]
        return t // SEG

    def tokens(self, now):
        """-> (the window's ids, how many of them are final): the final events' tokens are made
        once and kept; the others' (held notes end now) afresh at each call."""
        ev, marks = self.events, self.marks
        while len(marks) < len(ev) and self.final(ev[len(marks)], now):
            marks.append((len(self.stable), self.seg))
            self.seg = self.emit(self.stable, ev[len(marks) - 1], now, self.seg)
        tail, seg = [], self.seg
        for e in ev[len(marks):]:
            seg = self.emit(tail, e, now, seg)
        return self.head + self.stable + tail, len(self.head) + len(self.stable)

    def cut(self, keep):
        """Drop the oldest events, so that about `keep` tokens remain, at the first <T> boundary
        that allows it: the window starts on a segment, so the events kept keep their tokens."""
        ev, off = self.events, self.base - self.origin
        seg = [(e.q - off) // SEG for e in ev]
        i, size = len(ev), len(self.head)
        while i > 0 and size + 3 + seg[-1] - seg[i - 1] <= keep:
            i -= 1
            size += 3 if ev[i].pitch is not None else 2
        i = next((k for k in range(max(i, 1), len(ev)) if seg[k] > seg[k - 1]), max(i, 1))
        j = bisect.bisect_left(self.ped_ms, ev[i].start) - 1
        self.base += seg[i] * SEG
        self.events = ev[i:]
        if j >= 0 and self.ped_on[j] and self.pedal_mode:  # the pedal held at the new start is pressed there
            self.events.insert(0, Ev(self.base - self.origin, -1, self.base, self.base, None, 1))
        j = max(0, bisect.bisect_left(self.ped_ms, self.base) - 1)
        del self.ped_ms[:j], self.ped_on[:j], self.stable[:], self.marks[:]
        self.seg = 0

    def cut_aria(self, ms, n0):
        """The pianist took the lead at ms: Aria's events from n0 on that had not started are
        gone, her notes sounding end there, and so does her pedal."""
        self.events = [e for e in self.events if e.seq < n0 or e.start < ms]
        for e in self.events:
            if e.seq >= n0 and e.pitch is not None and e.end > ms:
                e.end, e.dur = ms, T.DUR_START + T.quantize_dur(round(ms - e.start)) // 10
        self.invalidate(next((i for i, e in enumerate(self.events) if e.seq >= n0), len(self.events)))
        j = bisect.bisect_left(self.ped_ms, ms)
        del self.ped_ms[j:], self.ped_on[j:]
        self.pedal(ms, 0)


def rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20)
    except (OSError, ValueError):  # not Linux
        return None


# -----------------------------------------------------------------------------
# The duet


class Duet:
    """The loop: listen (record, prefill), take over (decode, play), be interrupted, repeat."""

    def __init__(self, a, model, human, clock, record, log):
        self.a, self.model = a, model
        self.human, self.clock = human, clock
        self.record, self.log = record, log
        self.player = None  # main() sets it once the window is known to fit
        self.perf = Performance(model.pedal)  # the performance is tokenized in the model's vocabulary
        self.capacity, self.rate = min(model.config.max_seq_len, a.context), PRIOR_TOKENS_PER_S
        turn = self.allowance(fit=False)
        if self.capacity - turn - SLACK < MIN_WINDOW:
            raise S.Fail(f"the model reads {self.capacity} tokens (max_seq_len, --context {a.context}); a "
                         f"turn may add {turn} (--seconds {a.seconds:g}, --length {a.length}): "
                         f"{self.capacity - turn - SLACK} left for the performance, under {MIN_WINDOW}; "
                         "raise --context or lower --seconds or --length")
        self.cached, self.ids = [], []  # what the KV cache holds; the performance's tokens
        self.inbox, self.listen_from = collections.deque(), 0.0  # the pianist's (ms, message)s; counted from
        self.aria, self.taken_back = False, None  # Aria's turn; when the pianist took the lead
        self.last_key, self.heard = None, False  # a key since the last turn
        self.turns, self.per_turn = 0, []
        self.cuts, self.rebuilds = 0, 0
        self.counted, self.saved_at = (0, 0), 0.0
        self.cc_down, self.prefilled = False, 0
        self.chunk, self.lead_ms = 32, 50.0  # tokens a prefill chunk; her first note's lead (warm())
        self.device = model.model.tok_embeddings.weight.device
        model.setup_cache(1, self.capacity, device=self.device)

    def allowance(self, fit=True):
        """Tokens one turn may add: --seconds of music at 1.5 x the performance's rate (hers may be
        denser), at most --length; fit: leaving the window MIN_WINDOW."""
        want = min(self.a.length, math.ceil(self.a.seconds * self.rate * 1.5))
        return min(want, self.capacity - MIN_WINDOW - SLACK) if fit else want

    def window(self):
        return self.capacity - self.allowance() - SLACK

    def generate(self, ids, length, sampling, **kw):
        gpu = self.device.type == "cuda"
        return S.generate(self.model, ids, 1, length, sampling, device=self.device,
                          compile=self.a.compile and gpu, cuda_graph=self.a.cuda_graph and gpu, **kw)[0]

    def warm(self):
        """Before listening: one prefill and a few decode steps (allocation; compile where on), whose
        times size the prefill chunks and her first note's lead; all notes off and the pedal up."""
        ids = self.perf.head + [t for k in range(24) for t in (T.note_id("piano", 48 + k % 24, 60),
                                                              T.onset_id(k * 200), T.dur_id(400))]
        st = {}
        for _ in range(2):  # the second run's times: the first pays for one-off allocations
            self.generate(ids, 12, S.sampling_from_args(self.a, eos=False, dim=False), stats=st)
        self.chunk = int(min(256, max(16, (len(ids) - 1) / st["prefill_s"] * PREFILL_SLICE_S)))
        step = 1000 * st["step_s"]  # three steps a note: the lead covers one, 16 where FIRST_LEAD_MS allows
        self.lead_ms = max(4 * step, min(48 * step, FIRST_LEAD_MS)) + 10
        self.player.reset([self.a.channel])

    def receive(self, msg, ms):
        """A message of the pianist, from the input's thread as it arrives: a key while Aria plays
        stops her at once (after the pianist's key is known: her release spares it)."""
        self.player.human(msg, self.a.echo)
        key = msg.type == "note_on" and msg.velocity and msg.channel != 9
        if key and self.aria and self.taken_back is None:
            self.taken_back = ms
            self.player.stop()
        if self.record:
            self.record.add("pianist", msg, ms)
        self.inbox.append((ms, msg))

    def poll(self):
        """The pianist's messages into the performance (those during Aria's turn only as the state
        they leave); -> the time of a takeover control press, or None."""
        perf = self.perf
        while self.inbox:
            ms, msg = self.inbox.popleft()
            if msg.type == "control_change" and msg.control == self.a.takeover_cc:
                pressed, self.cc_down = msg.value >= 64 and not self.cc_down, msg.value >= 64
                if pressed and ms >= self.listen_from and perf.origin is not None:
                    return ms
            elif getattr(msg, "channel", 0) == 9 or ms < self.listen_from:
                continue
            elif msg.type == "note_on" and msg.velocity:
                perf.key_down(round(ms), msg.note, msg.velocity)
                self.last_key, self.heard = ms, True
            elif msg.type in ("note_on", "note_off"):
                perf.key_up(round(ms), msg.note)
                self.last_key = ms if not perf.keys else self.last_key
            elif msg.type == "control_change" and msg.control == 64:
                perf.pedal(round(ms), int(msg.value >= 64))
        return None

    def sync(self, now, final=False):
        """Prefill what the KV cache lacks of the performance's tokens up to `now`: while listening
        the final ones, a chunk at a time (first cutting the window when it is full); at the takeover
        all but the last. -> True while behind."""
        perf, t0 = self.perf, self.clock.now()
        if perf.origin is None:
            return False
        ids, stable = perf.tokens(now)
        if len(ids) > self.window():
            perf.cut(int(KEEP * self.window()))
            self.cuts += 1
            ids, stable = perf.tokens(now)
        self.rate = max(PRIOR_TOKENS_PER_S, len(ids) / max(10.0, (now - perf.base) / 1000))
        upto = len(ids) - 1 if final else min(stable, len(ids) - 1)
        k = min(len(ids), len(self.cached))  # how much of the cache still holds
        k = next((i for i, (x, y) in enumerate(zip(ids, self.cached)) if x != y), k)
        size = max(self.chunk, min(256, (upto - k) // 4))  # far behind: longer chunks, more tokens per second
        end = upto if final else min(upto, k + size)
        if k < end:
            self.rebuilds += k <= len(perf.head) < len(self.cached)
            for j in range(k, end, 256):  # (at most 256 at once: the memory a prefill takes stays put)
                with torch.no_grad():
                    self.model(torch.tensor([ids[j:min(end, j + 256)]], device=self.device), input_pos=j,
                               out_pos=torch.zeros(1, dtype=torch.long, device=self.device))
            if 16 <= end - k <= 256:  # the chunk that takes about PREFILL_SLICE_S on this machine, now
                rate = (end - k) / max(self.clock.now() - t0, 1e-4)
                self.chunk = int(min(256, max(16, rate * PREFILL_SLICE_S)))
        self.ids, self.cached = ids, ids[:max(k, end)]
        self.prefilled = max(0, end - k)
        return end < upto

    def listen(self):
        """Until the takeover; -> its time (ms), or None when a file is over and was answered."""
        a, perf = self.a, self.perf
        perf.pedal(round(self.listen_from), int(self.player.human_pedal))  # their pedal as it is now
        next_prefill = 0.0
        while not self.player.error:  # (main() says it)
            part_end = getattr(self.human, "part_end", None)  # (read first: its messages are in the inbox)
            signal, now = self.poll(), self.clock.ms()
            if signal is None and part_end is not None:
                if not self.heard:  # a part with no note: on to the next
                    self.human.resume(now)
                    continue
                signal = part_end
            rested = a.pause and self.heard and not perf.keys and now >= self.last_key + a.pause * 1e3
            if signal is None and rested:
                signal = self.last_key + a.pause * 1e3  # a pause ends `pause` s after the last key
            if signal is None and getattr(self.human, "finished", False) and not self.inbox:
                if not self.heard:
                    return None
                signal = now
            if signal is not None:
                self.heard = False
                return signal
            if now >= next_prefill:
                behind = self.sync(now)
                next_prefill = now + (0 if behind else a.prefill_every * 1000)
            self.save(SAVE_EVERY_S)
            self.clock.sleep(0.002)
        return None

    def play(self, t_take):
        """Aria's turn from the takeover at t_take ms; -> why it ended."""
        a, perf = self.a, self.perf
        pl, clock = self.player, self.clock
        pressed = [ms for ms, m in self.inbox if m.type == "note_on" and m.velocity and ms >= t_take]
        self.taken_back, self.aria = (pressed or [None])[0], True
        t0 = clock.now()
        perf.end_keys(round(t_take))
        self.sync(t_take, final=True)
        ids, base = self.ids, perf.base
        n0 = perf.n  # her events from here
        turn = dict(takeover_s=round(t_take / 1000, 3), context_tokens=len(ids),
                    context_s=round((t_take - base) / 1000, 2), prefill_behind=self.prefilled,
                    prefill_s=round(clock.now() - t0, 3))
        floor = round(clock.ms() + self.lead_ms - base)  # her first onset, on the tokens' timeline
        ids = ids + [T.SEG_ID] * max(0, floor // SEG - ids[len(perf.head):].count(T.SEG_ID))
        t_end = base + floor + a.seconds * 1000  # --seconds of her music, as it sounds (lateness included)
        info = G.prompt_info(ids, self.model.config.vocab_size)  # generate's `seconds` from its last onset
        t_last = base + info.last_ms
        sampling = S.sampling_from_args(a, seed=a.seed + self.turns, eos=a.may_end, dim=a.may_end,
                                        min_onset_ms=floor % SEG, max_onset_ms=floor % SEG + FIRST_REST_MS,
                                        seconds=(t_end - t_last) / 1000)
        stream, why = P.NoteStream(ids), []
        pl.begin_turn()
        if self.taken_back is not None:  # a key came with the takeover
            pl.stop()

        def on_step(i, toks):
            notes, changes = stream.feed(toks[0])
            over = lambda ms: base + ms + pl.shift * 1000 >= t_end  # noqa: E731
            for t, on in changes:
                ms = pl.pedal_change(base + t, on, a.channel)
                if ms is None:
                    return True
                perf.pedal(round(ms), on)
            for s, e, p, v, _ in notes:
                ms = None if over(s) else pl.note(base + s, base + e, p, v, a.channel)
                if ms is None:
                    why.append("seconds" if over(s) else "pianist")
                    return True
                perf.add(round(ms), p, v, round(ms) + e - s, T.DUR_START + (e - s) // T.TIME_STEP_MS)
            if over(stream.base):  # a rest past the end
                why.append("seconds")
                return True
            ahead = lambda: pl.turn["last_start"] - clock.now() > a.lookahead  # noqa: E731
            while ahead() and self.taken_back is None and not pl.error:
                self.save(SAVE_EVERY_S)
                clock.sleep(0.002)
            return self.taken_back is not None or pl.error is not None

        try:
            length = min(self.allowance(), self.capacity - len(ids))
            row = self.generate(ids, length, sampling, on_step=on_step, prefilled=len(self.cached))
            self.cached = row[:-1]
            why.append("<E>" if row[-1] == T.EOS_ID else "tokens")
            if self.taken_back is None and not pl.error:  # her sustain lifted as her last note ends
                perf.pedal(round(pl.end_turn(a.channel)), 0)
                while pl.busy() and self.taken_back is None and not pl.error:  # her last notes ring
                    self.save(SAVE_EVERY_S)
                    clock.sleep(0.002)
        finally:  # (a turn cut by Ctrl-C or an error counts too)
            self.aria, end = False, clock.ms() if self.taken_back is None else self.taken_back
            if self.taken_back is not None:
                perf.cut_aria(round(end), n0)
            self.listen_from, t = end, pl.turn
            since = lambda w: None if w is None else round((clock.ms(w) - t_take) / 1000, 3)  # noqa: E731
            self.per_turn.append(dict(
                first_note_s=since(t["first_sent"]), first_note_ready_s=since(t["first_ready"]),
                notes=t["notes"], late=t["late"], shift_s=round(pl.shift, 3), **turn, rss_mb=rss_mb(),
                cache_rebuilds=self.rebuilds - self.counted[0], cuts=self.cuts - self.counted[1]))
            self.counted, self.turns = (self.rebuilds, self.cuts), self.turns + 1
        return "pianist" if self.taken_back is not None else why[0]

    def save(self, every=0.0):
        """--save's file, if `every` s have passed since it was last written."""
        if self.record and self.clock.ms() - self.saved_at >= every * 1000:
            self.record.save()
            self.saved_at = self.clock.ms()

    def run(self):
        part = getattr(self.human, "part", None)
        while not self.a.turns or self.turns < self.a.turns:
            t_take = self.listen()
            if t_take is None:
                break
            why = self.play(t_take)
            t = self.per_turn[-1]
            self.log(f"turn {self.turns}: takeover at {t_take / 1000:.2f} s ({t['context_tokens']} tokens, "
                     f"{t['context_s']} s of music in context), first note decoded {t['first_note_ready_s']} "
                     f"s and played {t['first_note_s']} s later, {t['notes']} notes, ended by {why}")
            self.save()
            if part and (self.human.finished or self.turns == self.a.turns):
                break
            if part:
                self.human.resume(self.clock.ms())


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    ap = S.Parser(prog="live.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                  description="Play a duet with Aria in real time over MIDI. Sampling as the official demo's "
                  "README runs it (--temp 0.85 --min_p 0.05); --seconds: the music of each of her turns.")
    add = ap.add_argument
    add("--list", action="store_true", help="list the MIDI input and output ports and exit")
    add("--in", dest="inp", default=None, help="the pianist: a MIDI input port, or a .mid file played as one")
    add("--out", default="-", help="a MIDI output port, or - for JSON lines on stdout")
    add("--backend", default=None, help="a mido backend (default: MIDO_BACKEND, else rtmidi's default API), "
        "e.g. mido.backends.rtmidi/UNIX_JACK where there is no ALSA sequencer")
    add("--channel", type=int, default=0, help="the MIDI channel Aria plays on (0-15): another than the "
        "pianist's where the instrument allows, so that her notes and pedal never touch theirs")
    add("--takeover_cc", type=int, default=67,
        help="the control change that hands over to Aria (67: soft pedal, as the official demo)")
    add("--pause", type=float, default=0.0,
        help="also hand over after this many seconds with no key down; 0 = off")
    add("--takeover", type=float, default=None,
        help="file mode: Aria takes over after each this many seconds of the file, which then plays on")
    add("--turns", type=int, default=None,
        help="times Aria takes over; 0 = until Ctrl-C (default for a port; 1 for a file)")
    add("--may_end", action="store_true",
        help="let Aria sample <E> and <D> (end her turn herself); off, as in the official demo")
    add("--echo", action="store_true", help="send the pianist's notes to the output too (always with a file)")
    add("--save", default=None, help="keep the whole duet in this MIDI file (pianist, Aria: two tracks), "
        f"rewritten every {SAVE_EVERY_S} s, after each turn and at exit; an existing file gets a number")
    add("--overwrite", action="store_true", help="--save over an existing file")
    add("--length", type=int, default=2048, help="new tokens per turn at most")
    add("--context", type=int, default=4096, help="tokens the model reads at most (and its max_seq_len): the "
        "window of the performance plus what one turn may add")
    add("--prefill_every", type=float, default=0.25,
        help="seconds between prefills of the performance while the pianist plays")
    add("--lookahead", type=float, default=3.0, help="seconds of music Aria decodes ahead of the clock at "
        "most: a buffer for dense passages and big chords (what the pianist interrupts is dropped: no delay)")
    S.add_model_args(ap)
    ap.set_defaults(threads=max(1, (os.cpu_count() or 2) - 1))  # a core left to the player and the input
    # the official demo's README runs temperature 0.85, min-p 0.05; --seconds: music per turn
    S.add_sampling_args(ap, temp=0.85, min_p=0.05, seconds=20.0)
    return ap


def main(argv=None, clock=None):
    """clock: a P.SimClock runs a file-mode duet in simulated time (tests)."""
    a = build_parser().parse_args(argv)
    if a.list:
        print("inputs: " + ", ".join(map(repr, P.port_names("input", a.backend))))
        print("outputs: " + ", ".join(map(repr, P.port_names("output", a.backend))))
        return 0
    if a.inp is None:
        raise S.Fail("--in: a MIDI input port or a .mid file (python live.py --list names the ports)")
    for bad, msg in [(not 0 <= a.channel <= 15, "--channel: 0..15"), (a.seconds <= 0, "--seconds: > 0"),
                     (a.length < 1, "--length: >= 1"), (a.lookahead <= 0, "--lookahead: > 0"),
                     (a.takeover is not None and a.takeover <= 0, "--takeover: > 0")]:
        if bad:
            raise S.Fail(msg)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock, sink = clock or P.Clock(), [lambda msg, ms: None]  # a port's messages before the duet: dropped
    file_mode = Path(a.inp).suffix.lower() in (".mid", ".midi")
    a.turns = (1 if file_mode else 0) if a.turns is None else a.turns
    a.echo = a.echo or file_mode
    human = P.FileHuman(a.inp, a.takeover) if file_mode else \
        P.open_port(a.inp, "input", a.backend, callback=lambda m: sink[0](m, clock.ms()))  # before the model
    out = P.JsonOut() if a.out == "-" else P.open_port(a.out, "output", a.backend)
    device = S.pick_device(a.device)
    model, path = S.load_lm(a, device, S.pick_dtype(a.dtype, device))
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if a.out == "-" else print
    weights = (getattr(model, "quantized", None) or {"mode": "float"})["mode"]
    log(f"model: {path}, {model.num_params() / 1e6:.1f}M parameters, {device}, {weights} weights"
        + (", pedal" if model.pedal else ""))
    record = Recording(free_path(a.save, a.overwrite)) if a.save else None

    def on_send(who, msg, ms):
        if record and who == "aria":
            record.add(who, msg, ms)
    duet = Duet(a, model, human, clock, record, log)  # checks the window
    player = duet.player = P.Player(out, clock, on_send)
    error = None
    try:
        duet.warm()
        clock.start = clock.now()  # the duet's time 0
        sink[0] = duet.receive
        saving = f", saving {record.path}" if record else ""
        log(f"listening to {a.inp}, Aria on channel {a.channel}{saving}")
        if file_mode:
            human.start(clock, duet.receive)
        duet.run()
    except KeyboardInterrupt:
        log("stopped (Ctrl-C)")
    except Exception as e:  # the notes go off first; then one line
        error = f"{type(e).__name__}: {e}"
    finally:
        stuck = player.close()
        for port in (human, out):  # (closing an output lets its last messages out: JACK's cycle)
            getattr(port, "close", lambda: None)()
        duet.save()
    turns = duet.per_turn
    played = [t for t in turns if t["first_note_s"] is not None]
    summary = dict(summary=True, first_note_s=max((t["first_note_s"] for t in played), default=None),
                   first_note_ready_s=max((t["first_note_ready_s"] for t in played), default=None),
                   notes=player.stats["notes"], late=player.stats["late"], stuck=stuck,
                   shift_s=max((t["shift_s"] for t in turns), default=0.0), turns=duet.turns, per_turn=turns,
                   saved=record and str(record.path))
    if a.out == "-" and not player.error:  # (a reader that left has already made player.error)
        print(json.dumps(summary), flush=True)
    elif a.out != "-":
        print(f"{summary['notes']} notes in {duet.turns} turns, {summary['late']} late, {stuck} stuck"
              + (f"; the duet is in {record.path}" if record else ""))
    if error or player.error:
        raise P.LiveError(error or player.error)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (S.Fail, P.LiveError) as e:
        if "BrokenPipe" in str(e):  # --out -'s reader left (`| head`)
            S.quiet_stdout()
        print(f"live.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the duet started: nothing was sent
        print("live.py: stopped", file=sys.stderr)
        sys.exit(130)
