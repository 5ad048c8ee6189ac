"""
Play a duet with Aria in real time: a pianist plays into a MIDI input; when they hand over (a
pedal press, a pause, or a time in file mode) Aria continues on a MIDI output, with the sustain
pedal where the checkpoint speaks it, until the pianist plays again and takes back the lead.

    python live.py --list                                          # the MIDI ports (needs python-rtmidi)
    python live.py --in "Digital Piano" --out "Digital Piano" --ckpt aria-medium-gen --quantize int4
    python live.py --in prompt.mid --takeover 15 --out "FluidSynth"    # a file as the pianist
    python live.py --in prompt.mid --pause 1.5 --turns 3 --out -       # JSON lines, one per message

What it does, after the official demo (EleutherAI/aria demo/demo_mlx.py), in plain mido:
- listen: every note and pedal change from --in is recorded on one timeline (ms since the start);
  every --prefill_every seconds the performance so far is tokenized (held notes end "now") and the
  tokens the KV cache does not hold yet are prefilled, so at takeover only a few remain.
- takeover: a control change (--takeover_cc, 67 = the soft pedal, as the official demo), no key
  down for --pause seconds, or --takeover seconds into a file. Aria's first note starts no earlier
  than 200 ms before that moment (<T> tokens up to now's 5-s segment, then an onset floor).
- play: each note is sent the moment its tokens are decoded, at its time on the wall clock, by a
  scheduler thread. Late notes are never dropped: a note decoded after its time starts at once;
  more than 50 ms after its time it counts as late and the timeline moves by the delay, so the
  notes after it keep their rhythm. Aria decodes at most --lookahead seconds ahead.
- take back: any note from the pianist while Aria plays stops it at once (its sounding notes are
  released, the pedal lifted); --turns N hands over N times. On every exit (the end, Ctrl-C, an
  error, a vanished port) every note Aria or a file started is released and the pedal lifted.
The last line of `--out -` is a summary: first_note_s (takeover -> first Aria note sent, her chosen
rest included), first_note_ready_s (takeover -> that note decoded and scheduled: the latency),
notes, late, stuck (notes left on), shift_s (how far lateness moved the timeline).
"""
import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import mido
import torch

import player as P
import sample as S
import tokenizer as T

FIRST_NOTE_SLACK_MS = 200  # Aria's first onset: no earlier than this before the takeover (official demo)
PREFILL_CHUNK = 32       # tokens per prefill while listening (official demo: 16): a takeover waits for one at most


class FileHuman:
    """A MIDI file played as the pianist: its messages arrive in real time (iter_pending, as from a
    mido input port); with `until` seconds it stops there, releasing its keys and its pedal."""

    def __init__(self, path, until=None):
        try:
            t, events = 0.0, []
            for msg in mido.MidiFile(path):  # all tracks merged, delta times in seconds, tempo applied
                t += msg.time
                if not msg.is_meta and (until is None or t < until):
                    events.append((t, msg))
        except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
            raise P.LiveError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from None
        if until is not None:  # the pianist stops at `until`: keys up, pedal up
            held = {}
            for _, m in events:
                if m.type in ("note_on", "note_off"):
                    held[m.channel, m.note] = m.type == "note_on" and m.velocity > 0
            events += [(until, mido.Message("note_off", channel=c, note=n)) for (c, n), on in held.items() if on]
            events += [(until, mido.Message("control_change", channel=c, control=64, value=0))
                       for c in {m.channel for _, m in events if hasattr(m, "channel")}]
        self.events, self.queue, self.finished = events, queue.Queue(), False

    def start(self, clock):
        self.clock = clock
        threading.Thread(target=self._feed, daemon=True).start()
        return self

    def _feed(self):
        for t, msg in self.events:
            time.sleep(max(0.0, self.clock.start + t - time.perf_counter()))
            self.queue.put(msg)
        self.finished = True

    def iter_pending(self):
        while not self.queue.empty():
            yield self.queue.get_nowait()

    def close(self):
        pass



# -----------------------------------------------------------------------------
# The performance so far, as tokens


class Performance:
    """Every note and pedal change so far (pianist's and Aria's), in ms since the start, and its
    tokens: a prompt (no <D>, no <E>) whose time 0 is the first note (`origin` ms)."""

    def __init__(self, pedal_mode):
        self.notes, self.held, self.pedals, self.pedal_mode, self.origin = [], {}, [], pedal_mode, None

    def human(self, msg, ms):
        """Record a message of the pianist; -> True for a key pressed (drums, channel 10, are not kept)."""
        if getattr(msg, "channel", None) == 9:
            return False
        if msg.type == "note_on" and msg.velocity > 0:
            self.origin = ms if self.origin is None else self.origin
            self.release(msg.channel, msg.note, ms)
            self.held[msg.channel, msg.note] = (ms, msg.velocity)
            return True
        if msg.type in ("note_on", "note_off"):
            self.release(msg.channel, msg.note, ms)
        elif msg.type == "control_change" and msg.control == 64:
            self.pedals.append((ms, int(msg.value >= 64)))
        return False

    def release(self, channel, pitch, ms):
        if (channel, pitch) in self.held:
            start, vel = self.held.pop((channel, pitch))
            self.notes.append((start, max(ms, start + 10), pitch, vel))

    def tokens(self, now_ms, context):
        """The performance up to now as tokens (held notes end now), at most `context` tokens: older
        notes are left out when it is longer."""
        notes = self.notes + [(s, now_ms, p, v) for (_, p), (s, v) in self.held.items()]
        notes = sorted(n for n in notes if n[0] < now_ms)
        while True:
            t0 = notes[0][0]
            ms = lambda t: round(t - t0)  # noqa: E731  (ticks are integers: 1 tick = 1 ms)
            midi = T.notes_to_midi([(ms(s), ms(max(e, s + 10)), p, v, 0) for s, e, p, v in notes], {0: 0},
                                   [(ms(t), on) for t, on in self.pedals if t0 <= t < now_ms])
            ids = T.tokenize(T.load_midi(midi), dim=False, eos=False, keep_silence=True, pedal=self.pedal_mode)
            if len(ids) <= context or len(notes) < 8:
                self.origin = t0
                return ids
            notes = notes[len(notes) // 4:]  # a quarter of the notes out, at most a few times per hour


# -----------------------------------------------------------------------------
# The duet


class Duet:
    """The loop: listen (record, prefill), take over (decode, play), be interrupted, repeat."""

    def __init__(self, a, model, human, player, clock, log):
        self.a, self.model, self.human, self.player, self.clock, self.log = a, model, human, player, clock, log
        self.pedal_mode = model.pedal  # the performance is tokenized in the model's vocabulary
        self.perf = Performance(self.pedal_mode)
        self.cached = []  # the tokens whose keys and values the KV cache holds, from position 0
        self.context = min(model.config.max_seq_len, a.context) - a.length - 8
        self.first_notes, self.first_ready = [], []  # per turn: takeover -> first note sent / decoded
        self.turns, self.last_key, self.heard = 0, None, False  # heard: a key since the last turn
        self.device = model.model.tok_embeddings.weight.device
        model.setup_cache(1, min(model.config.max_seq_len, a.context), device=self.device)

    def poll(self):
        """Take the pianist's pending messages; -> (a key was pressed, the takeover control was pressed)."""
        pressed = takeover = False
        for msg in self.human.iter_pending():
            ms = self.clock.ms()
            if self.a.echo:
                self.player.echo(msg)
            if self.perf.human(msg, ms):
                pressed, self.last_key, self.heard = True, ms, True
            elif msg.type == "control_change" and msg.control == self.a.takeover_cc and msg.value >= 64:
                takeover = True
            if not self.perf.held and msg.type in ("note_on", "note_off"):
                self.last_key = ms
        return pressed, takeover

    def prefill(self, ids, limit=None):
        """Put ids[:-1] (at most `limit` more tokens of it) in the KV cache, from where it first
        differs from what the cache holds."""
        k = next((i for i, (x, y) in enumerate(zip(ids, self.cached)) if x != y), min(len(ids), len(self.cached)))
        end = min(len(ids) - 1, k + (limit or len(ids)))
        if k < end:
            with torch.no_grad():
                self.model(torch.tensor([ids[k:end]], device=self.device), input_pos=k,
                           out_pos=torch.zeros(1, dtype=torch.long, device=self.device))
        self.cached = ids[:end]
        return end == len(ids) - 1  # all in

    def listen(self):
        """Until the takeover; -> the time of its signal (ms), or None when a file has ended and was
        answered. Prefills run between polls, a chunk at a time."""
        last_prefill = time.perf_counter()
        while True:
            _, takeover = self.poll()
            heard, now = self.heard, self.clock.ms()
            paused = self.a.pause and self.last_key is not None and not self.perf.held and \
                now - self.last_key >= self.a.pause * 1000
            at_time = self.a.takeover is not None and now >= self.a.takeover * 1000 and self.turns == 0
            ended = getattr(self.human, "finished", False) and not self.perf.held  # a file is over
            if self.perf.origin is not None and (takeover or paused and heard or at_time or ended and heard):
                self.heard = False  # the signal's time: a pause ends pause s after the last key; a file at --takeover
                return min(now, self.last_key + self.a.pause * 1000 if paused else self.a.takeover * 1000 if at_time else now)
            if ended:
                return None
            if heard and time.perf_counter() - last_prefill >= self.a.prefill_every:
                done = self.prefill(self.perf.tokens(now, self.context), PREFILL_CHUNK)
                last_prefill = time.perf_counter() - (0 if done else self.a.prefill_every)  # behind: again at once
            time.sleep(0.002)

    def play(self, t_take):
        """Aria's turn from the takeover at t_take ms; -> True if the pianist took back the lead."""
        a, perf = self.a, self.perf
        ids = perf.tokens(t_take, self.context)
        floor = max(0, int(t_take - FIRST_NOTE_SLACK_MS - perf.origin))  # on the tokens' timeline
        body = ids.index(T.BOS_ID) + 1
        ids += [T.SEG_ID] * max(0, floor // T.SEGMENT_MS - ids[body:].count(T.SEG_ID))
        same_segment = ids[body:].count(T.SEG_ID) == floor // T.SEGMENT_MS
        self.prefill(ids)  # the cache now holds ids[:-1]
        stream, origin, interrupted = P.NoteStream(ids), perf.origin, []
        length = min(a.length, self.model.model.encode_layers[0].kv_cache.k.shape[2] - len(ids))

        def on_step(i, toks):
            notes, changes = stream.feed(toks[0])
            for s, e, p, v, ch in notes:
                self.player.note(s + origin, e + origin, p, v, ch)
                perf.notes.append((s + origin, e + origin, p, v))
            for t, on in changes:
                self.player.pedal_change(t + origin, on)
                perf.pedals.append((t + origin, on))
            while True:  # no further ahead of the music than --lookahead
                if self.poll()[0] or self.player.error:
                    interrupted.append(True)
                    return True
                if not notes or self.player.stats["last_start"] - time.perf_counter() < a.lookahead:
                    return False
                time.sleep(0.002)

        sampling = S.sampling_from_args(a, seed=a.seed + self.turns,
                                        min_onset_ms=floor % T.SEGMENT_MS if same_segment else 0)
        gpu = self.device.type == "cuda"
        row = S.generate(self.model, ids, 1, length, sampling, device=self.device, on_step=on_step,
                         prefilled=len(ids) - 1, compile=a.compile and gpu, cuda_graph=a.cuda_graph and gpu)[0]
        self.cached = row[:-1]
        while not interrupted and self.player.busy():  # let the last notes ring, still listening
            if self.poll()[0] or self.player.error:
                interrupted.append(True)
            time.sleep(0.002)
        if interrupted:
            self.player.silence()
            now = self.clock.ms()
            perf.notes = [(s, min(e, now), p, v) for s, e, p, v in perf.notes if s < now]
            perf.pedals = [(t, on) for t, on in perf.pedals if t < now]
            if perf.pedals and perf.pedals[-1][1]:  # Aria's pedal was lifted with her notes
                perf.pedals.append((now, 0))
            self.last_key = now
        return bool(interrupted)

    def run(self):
        while not self.a.turns or self.turns < self.a.turns:
            t_take = self.listen()
            if t_take is None:
                break
            self.player.stats.update(first_sent=None, first_ready=None)
            took_back = self.play(t_take)
            self.turns += 1
            since = lambda t: round(t - self.clock.start - t_take / 1000, 3)  # noqa: E731
            if self.player.stats["first_sent"] is not None:
                self.first_notes.append(since(self.player.stats["first_sent"]))
                self.first_ready.append(since(self.player.stats["first_ready"]))
            self.log(f"turn {self.turns}: takeover at {t_take / 1000:.2f} s, first note decoded "
                     f"{self.first_ready[-1] if self.first_ready else '-'} s and played "
                     f"{self.first_notes[-1] if self.first_notes else '-'} s later, "
                     f"{'taken back by the pianist' if took_back else 'ended'}")


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    ap = S.Parser(prog="live.py", description="Play a duet with Aria in real time over MIDI.",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the MIDI input and output ports and exit")
    ap.add_argument("--in", dest="inp", default=None,
                    help="the pianist: a MIDI input port, or a .mid file played in real time")
    ap.add_argument("--out", default="-", help="a MIDI output port, or - for JSON lines on stdout")
    ap.add_argument("--takeover_cc", type=int, default=67,
                    help="the control change that hands over to Aria (67: soft pedal, as the official demo)")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="also hand over after this many seconds with no key down; 0 = off")
    ap.add_argument("--takeover", type=float, default=None,
                    help="file mode: the pianist (the file) stops after this many seconds and Aria takes over")
    ap.add_argument("--turns", type=int, default=1, help="times Aria takes over; 0 = until the end (Ctrl-C)")
    ap.add_argument("--echo", action="store_true",
                    help="send the pianist's notes to the output too (always on with a file as --in)")
    ap.add_argument("--length", type=int, default=2048, help="new tokens per turn at most")
    ap.add_argument("--context", type=int, default=4096,
                    help="tokens of the performance the model sees at most (older notes are left out)")
    ap.add_argument("--prefill_every", type=float, default=0.25,
                    help="seconds between prefills of the performance while the pianist plays")
    ap.add_argument("--lookahead", type=float, default=3.0,
                    help="seconds of music Aria decodes ahead of the clock at most: a buffer for dense passages "
                         "and big chords (what the pianist interrupts is dropped, so a longer one costs no delay)")
    S.add_model_args(ap)
    S.add_sampling_args(ap)
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.list:
        print("inputs: " + ", ".join(map(repr, P.port_names("input"))))
        print("outputs: " + ", ".join(map(repr, P.port_names("output"))))
        return 0
    if a.inp is None:
        raise S.Fail("--in: a MIDI input port or a .mid file (python live.py --list names the ports)")
    if a.threads:
        torch.set_num_threads(a.threads)
    file_mode = Path(a.inp).suffix.lower() in (".mid", ".midi")
    human = FileHuman(a.inp, a.takeover) if file_mode else P.open_port(a.inp, "input")  # before the model: fail fast
    out = P.JsonOut() if a.out == "-" else P.open_port(a.out, "output")
    a.echo = a.echo or file_mode
    device = S.pick_device(a.device)
    model, path = S.load_lm(a, device, S.pick_dtype(a.dtype, device))
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if a.out == "-" else print
    log(f"model: {path}, {model.num_params() / 1e6:.1f}M parameters, {device}, "
        f"{(getattr(model, 'quantized', None) or {'mode': 'float'})['mode']} weights{', pedal' if model.pedal else ''}")
    clock = P.Clock()
    if file_mode:
        human.start(clock)
    player = P.Player(out, clock)
    duet = Duet(a, model, human, player, clock, log)
    error = None
    try:
        duet.run()
    except KeyboardInterrupt:
        log("stopped (Ctrl-C)")
    except Exception as e:  # the notes go off first; then one line
        error = f"{type(e).__name__}: {e}"
    finally:
        stuck = player.close()
        human.close()
    summary = dict(summary=True, first_note_s=max(duet.first_notes, default=None), first_note_s_turns=duet.first_notes,
                   first_note_ready_s=max(duet.first_ready, default=None),
                   notes=player.stats["notes"], late=player.stats["late"], stuck=stuck,
                   shift_s=round(player.shift, 3), turns=duet.turns)
    if a.out == "-" and not player.error:  # (a reader that left has already made player.error)
        print(json.dumps(summary), flush=True)
    elif a.out != "-":
        print(f"{summary['notes']} notes in {duet.turns} turns, {summary['late']} late, {stuck} stuck")
    if error or player.error:
        raise P.LiveError(error or player.error)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (S.Fail, P.LiveError) as e:
        S.quiet_stdout() if "BrokenPipe" in str(e) else None  # --out -'s reader left (`| head`)
        print(f"live.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the duet started: nothing was sent
        print("live.py: stopped", file=sys.stderr)
        sys.exit(130)
