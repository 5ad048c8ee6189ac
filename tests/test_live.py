"""live.py (the duet) and sample.py's live options (--stream, --port, --seconds), on CPU with a
MIDI file as the pianist and a recording stand-in for the output port: takeover latency, notes in
order and on time, the pianist taking back the lead, lateness counted when the model is slower
than the music and forgotten at the next turn, all notes off on every way out, one-line errors for
ports. Long sessions run on a simulated clock (player.SimClock): the window that moves rarely and
its cache, the pedal after each turn; real ports through JACK's dummy driver where jackd is."""
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mido
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import live as L  # noqa: E402
import grammar as G  # noqa: E402
import model as M  # noqa: E402
import player as P  # noqa: E402
import sample as S  # noqa: E402
import tokenizer as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.usefixtures("one_thread")


def write_midi(path, notes, pedals=()):
    """notes: (start_ms, end_ms, pitch, velocity); 1 tick = 1 ms."""
    T.notes_to_midi([(*n, 0) for n in notes], {0: 0}, pedals).save(str(path))
    return path


def phrase(start_ms, seconds, step=250):
    return [(start_ms + i * step, start_ms + i * step + 400, 48 + (i * 7) % 24, 60 + 5 * (i % 4))
            for i in range(int(seconds * 1000 / step))]


def small(seed=0, **config):
    torch.manual_seed(seed)
    return M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, **{"max_seq_len": 2048, **config})).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    M.save_checkpoint(d / "run" / "ckpt.pt", small())
    write_midi(d / "solo.mid", phrase(0, 2.0), [(0, 1), (1500, 0)])
    # plays 0-1.5 s, rests, plays again at 4 s: with --pause 0.5 Aria takes over at ~2 s, is stopped at 4 s
    write_midi(d / "gap.mid", phrase(0, 1.5) + phrase(4000, 1.0))
    write_midi(d / "six.mid", phrase(0, 6.0))
    return d


def live_args(files, *args, ckpt="run"):
    return ["--ckpt", str(files / ckpt), "--device", "cpu", "--threads", "1", *map(str, args)]


def duet(files, *args):
    """live.py as a command, JSON lines out; -> the CompletedProcess with .msgs and .summary."""
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), *live_args(files, "--out", "-", *args)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    r.msgs, r.summary = [x for x in lines if "summary" not in x], lines[-1] if lines else None
    return r


def note_ons(msgs, who):
    return [m for m in msgs if m["type"] == "note_on" and m["velocity"] > 0 and m["who"] == who]


def left_on(msgs):
    on = {}
    for m in msgs:
        if m["type"] in ("note_on", "note_off"):
            on[m["channel"], m["note"]] = m["type"] == "note_on" and m["velocity"] > 0
    return [k for k, v in on.items() if v]


def test_file_duet_takes_over_fast_and_plays_on_time(files):
    r = duet(files, "--in", files / "solo.mid", "--takeover", 2.0, "--seconds", 3)
    assert r.returncode == 0, r.stderr
    msgs, summary = r.msgs, r.summary
    human, aria = note_ons(msgs, "pianist"), note_ons(msgs, "aria")
    assert len(human) == 8 and all(m["sent"] < 2.05 for m in human)  # the file stops at --takeover
    # decoded and scheduled within 0.5 s; played when its onset says (an untrained model rests at random)
    assert len(aria) >= 3 and summary["first_note_ready_s"] < 0.5
    assert summary["first_note_s"] == pytest.approx(aria[0]["sent"] - 2.0, abs=0.02)
    assert [m["sent"] for m in aria] == sorted(m["sent"] for m in aria)  # in order
    assert all(m["sent"] - m["due"] <= 0.05 for m in aria) and summary["late"] == 0  # on time
    assert all(m["due"] >= 2.0 - 0.2 - 0.01 for m in aria)  # no first onset more than 200 ms in the past
    assert summary["notes"] == len(aria) and summary["stuck"] == 0 and left_on(msgs) == []
    assert msgs[-1]["type"] == "control_change" and msgs[-1]["control"] == 64 and msgs[-1]["value"] == 0


def test_pianist_takes_back_the_lead(files, capsys):
    # in this process, in real time: JSON lines as the CLI writes them
    assert L.main(live_args(files, "--out", "-", "--in", files / "gap.mid", "--pause", 0.5, "--turns", 2,
                            "--seconds", 3)) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    msgs, summary = lines[:-1], lines[-1]
    back = next(m["sent"] for m in note_ons(msgs, "pianist") if m["sent"] > 3.5)  # the file again at 4 s
    aria = note_ons(msgs, "aria")
    first_turn = [m for m in aria if m["sent"] < back]
    assert first_turn and first_turn[0]["sent"] > 1.5 + 0.5  # after the pause
    assert not [m for m in aria if back < m["sent"] < back + 1.0]  # silent once the pianist plays
    released = {(m["channel"], m["note"]) for m in msgs if m["who"] == "aria" and m["type"] == "note_off"
                and back <= m["sent"] < back + 0.05}
    assert released  # Aria's sounding notes stopped at once
    assert summary["turns"] == 2 and max(m["sent"] for m in aria) > back + 1.0  # and took over again later
    assert summary["stuck"] == 0 and left_on(msgs) == []


class Recorder:
    """A stand-in for a mido output port: keeps every message with its send time; `fail_after`
    messages later it raises, as a vanished port does."""

    def __init__(self, fail_after=None):
        self.msgs, self.fail_after = [], fail_after

    def send(self, msg):
        if self.fail_after is not None and len(self.msgs) >= self.fail_after:
            raise OSError("port vanished")
        self.msgs.append((time.perf_counter(), msg))

    def left_on(self):
        return left_on([{**m.dict(), "velocity": getattr(m, "velocity", 0)} for _, m in self.msgs])

    def close(self):
        pass


def run_live(monkeypatch, files, recorder, *args, slow=0.0, fail_at=None, exc=RuntimeError):
    """live.main in this process with `recorder` as the output; the model sleeps `slow` s per step,
    and raises exc at step `fail_at`."""
    real_load = S.load_lm
    calls = [0]

    def load(a, device, dtype):
        model, path = real_load(a, device, dtype)
        forward = model.forward

        def step(ids, *fa, **fk):
            if fk.get("input_pos") is not None and ids.shape[1] == 1:
                calls[0] += 1
                time.sleep(slow)
                if fail_at is not None and calls[0] == fail_at:
                    raise exc("boom")
            out = forward(ids, *fa, **fk)
            if slow:  # dense music: the earliest onsets allowed (chords), so the slow model falls behind
                out[..., T.ONSET_START:T.ONSET_START + 500] -= torch.arange(500.0)
            return out
        model.forward = step
        return model, path
    monkeypatch.setattr(S, "load_lm", load)
    monkeypatch.setattr(P, "open_port", lambda name, kind, *a, **kw: recorder)
    return L.main(live_args(files, "--out", "port", *args))


def test_late_notes_are_counted_and_played_when_the_model_is_slow(monkeypatch, files, capsys):
    rec = Recorder()
    assert run_live(monkeypatch, files, rec, "--in", files / "solo.mid", "--takeover", 1.0, "--seconds", 4,
                    "--length", 60, slow=0.05) == 0  # 3 steps a note at 50 ms, notes in chords
    out = capsys.readouterr().out
    notes, late = (int(x) for x in re.search(r"^(\d+) notes in \d+ turns, (\d+) late", out, re.M).groups())
    assert notes > 3 and late > 0, out  # counted, and every decoded note was still played
    assert "0 stuck" in out and rec.left_on() == []


def note_ons_in(track):
    return [m for m in track if m.type == "note_on" and m.velocity]


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt, 0), (RuntimeError, 1)], ids=["ctrl-c", "error"])
def test_all_notes_off_on_the_way_out_and_the_duet_saved(monkeypatch, files, capsys, tmp_path, exc, code):
    rec, saved = Recorder(), tmp_path / "duet.mid"
    args = ("--in", files / "solo.mid", "--takeover", 1.0, "--lookahead", 3, "--save", saved, "--channel", 1)
    if code == 0:
        assert run_live(monkeypatch, files, rec, *args, fail_at=40, exc=exc) == 0
    else:
        with pytest.raises(P.LiveError, match="RuntimeError: boom"):
            run_live(monkeypatch, files, rec, *args, fail_at=40, exc=exc)
    assert any(m.type == "note_on" and m.velocity for _, m in rec.msgs)
    assert rec.left_on() == [] and rec.msgs[-1][1].type == "control_change" and rec.msgs[-1][1].value == 0
    # the file holds every note the pianist played and every note Aria sent, on their tracks
    mid = mido.MidiFile(saved)
    assert [t.name for t in mid.tracks] == ["pianist", "aria"] and T.tokenize(saved)
    sent = [m for _, m in rec.msgs if m.type == "note_on" and m.velocity and m.channel == 1]  # hers
    assert [len(note_ons_in(t)) for t in mid.tracks] == [4, len(sent)]  # the file's 4 notes to its takeover
    assert L.free_path(saved, False) == tmp_path / "duet-2.mid" and L.free_path(saved, True) == saved


def test_a_vanished_port_is_one_line(monkeypatch, files):
    with pytest.raises(P.LiveError, match="the output stopped taking messages"):
        run_live(monkeypatch, files, Recorder(fail_after=5), "--in", files / "solo.mid", "--takeover", 1.0,
                 "--seconds", 2)


def test_port_errors_are_one_line(files, monkeypatch, capfd):
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), "--in", "Nope"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("live.py: error:")
    assert "python-rtmidi" in r.stderr or "no MIDI input named 'Nope'" in r.stderr
    if "ALSA" in r.stderr:  # no ALSA sequencer here (a container): what to try
        assert "--backend mido.backends.rtmidi/UNIX_JACK" in r.stderr and "jackd -d dummy" in r.stderr
    # no JACK server, no such backend: one line too, and nothing from the C libraries on the terminal
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "none-here")
    for backend, says in [("mido.backends.rtmidi/UNIX_JACK", "JACK server is not running|python-rtmidi"),
                          ("mido.backends.nope", "--backend mido.backends.nope: No module")]:
        with pytest.raises(P.LiveError, match=says) as e:
            P.open_port("Nope", "input", backend)
        assert "\n" not in str(e.value) and capfd.readouterr().err == ""
    monkeypatch.setattr(mido, "get_output_names", lambda: ["Synth A", "Synth B"])
    with pytest.raises(P.LiveError, match="no MIDI output named 'X'; outputs: 'Synth A', 'Synth B'"):
        P.open_port("X", "output")
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), "--in", files / "missing.mid"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.mid" in r.stderr


def test_the_window_must_hold_a_performance(files):
    # the model reads 600 tokens, a 20-s turn may add ~900: one line naming the options, before anything plays
    with pytest.raises(S.Fail, match=r"under 500; raise --context or lower --seconds or --length"):
        L.main(live_args(files, "--in", files / "solo.mid", "--context", 600))


def test_performance_tokens_are_the_tokenizers():
    # notes and pedal changes fed one by one, tokens taken at random moments (held notes end then), the
    # final ones kept: at the end the same ids as tokenizing the whole performance at once
    for seed in range(12):
        rng, perf = random.Random(seed), L.Performance(pedal_mode=seed % 2 == 1)
        t, ped = 1000, 0
        held, notes = {60: 0}, []
        pedals = []
        perf.key_down(1000, 60, 64)  # the first note: time 0 of the tokens
        for _ in range(200):
            t += rng.randint(1, 120)
            p = rng.randint(40, 90)
            if rng.random() < 0.15:
                ped = 1 - ped
                perf.pedal(t, ped)
                pedals.append((t - 1000, ped))
            elif p in held:
                perf.key_up(t, p)
                notes.append((held.pop(p), t - 1000, p))
            else:
                held[p] = t - 1000
                perf.key_down(t, p, 64)
            if rng.random() < 0.1:
                perf.tokens(t)
        for p in held:
            perf.key_up(t + 50, p)
            notes.append((held[p], t + 50 - 1000, p))
        perf.pedal(t + 60, 0)
        ids, final = perf.tokens(t + 70)
        pedals += [(t + 60 - 1000, 0)] * ped
        midi = T.notes_to_midi([(s, e, p, 64, 0) for s, e, p in notes], {0: 0}, pedals)
        assert ids == T.tokenize(midi, dim=False, eos=False, keep_silence=True, pedal=seed % 2 == 1)
        assert final == len(ids)


def sim(monkeypatch, capsys, files, *args, clock=None, ckpt="run"):
    """live.main on a simulated clock, JSON lines out; -> .msgs, .summary, .duet (the Duet) and .prompts
    (each turn's)."""
    run = SimpleNamespace(prompts=[], duet=None)
    real = S.generate

    class Kept(L.Duet):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            run.duet = self

    def generate(model, ids, *a, **kw):
        if kw.get("on_step"):
            run.prompts.append(list(ids))
        return real(model, ids, *a, **kw)
    monkeypatch.setattr(L, "Duet", Kept)
    monkeypatch.setattr(S, "generate", generate)
    assert L.main(live_args(files, "--out", "-", *args, ckpt=ckpt), clock=clock or P.SimClock()) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    run.msgs, run.summary = lines[:-1], lines[-1]
    return run


def test_a_long_performance_moves_the_window_rarely(monkeypatch, capsys, files, tmp_path):
    # 90 s of dense music (30 tokens/s, the pedal down every other second), Aria answering each 30 s: the
    # performance grows to ~3.5x the window (context 1024: 836 tokens); its start moves only at cuts, and
    # the cache is rebuilt only then
    pedal = [(t, t // 1000 % 2 == 0) for t in range(0, 90000, 1000)]
    write_midi(tmp_path / "long.mid", phrase(0, 90.0, 100), pedal)
    run = sim(monkeypatch, capsys, files, "--in", tmp_path / "long.mid", "--takeover", 30, "--turns", 3,
              "--seconds", 4, "--context", 1024)
    summary, duet = run.summary, run.duet
    assert summary["turns"] == 3 and summary["late"] == summary["stuck"] == 0 and left_on(run.msgs) == []
    assert 780 <= duet.window() <= 836 and 3 <= duet.cuts <= 12 and duet.rebuilds == duet.cuts
    played = note_ons(run.msgs, "pianist")
    for turn, prompt in zip(summary["per_turn"], run.prompts):
        assert turn["first_note_s"] <= 0.5 and turn["context_s"] >= 10 and turn["context_tokens"] <= 836
        assert turn["prefill_behind"] <= 32  # the takeover prefilled only the last notes
        heard = [m["note"] for m in played if m["sent"] < turn["takeover_s"]]
        assert [n[2] for n in T.detokenize_notes(prompt)[0][-8:]] == heard[-8:]  # up to the takeover
    assert sum(t["cache_rebuilds"] for t in summary["per_turn"]) == duet.cuts


def test_lateness_heals_at_the_next_turn(monkeypatch, capsys, files):
    # turn 1 decodes at 60 ms a step (dense chords: late notes, the timeline moves); turn 2 is fast again and
    # starts on time; the context keeps turn 1's notes where they sounded
    clock, real = P.SimClock(), M.Aria.forward
    duets = []

    def forward(self, ids, *a, **kw):
        out = real(self, ids, *a, **kw)
        if ids.shape[1] == 1 and kw.get("input_pos") is not None and duets[0].aria and duets[0].turns == 0:
            clock.sleep(0.06)
            out[..., T.ONSET_START:T.ONSET_START + 500] -= torch.arange(500.0)
        return out
    monkeypatch.setattr(M.Aria, "forward", forward)
    monkeypatch.setattr(L.Duet, "warm", lambda self, warm=L.Duet.warm: [duets.append(self), warm(self)])
    run = sim(monkeypatch, capsys, files, "--in", files / "six.mid", "--takeover", 2, "--turns", 2,
              "--seconds", 2, clock=clock)
    first, second = run.summary["per_turn"]
    assert first["late"] > 0 and first["shift_s"] > 0.1 and second["late"] == 0 and second["shift_s"] == 0
    aria = note_ons(run.msgs, "aria")
    back = min(m["sent"] for m in note_ons(run.msgs, "pianist") if m["sent"] > 2.5)  # the file's second part
    assert all(abs(m["sent"] - m["due"]) < 0.005 for m in aria if m["sent"] > back)  # on its own time again
    heard = {(round(n[0] / 10), n[2]) for n in T.detokenize_notes(run.prompts[1])[0]}  # (10 ms, pitch)
    for m in [m for m in aria if m["sent"] < back]:  # (sim: sent when the clock gets there; due is when)
        assert {(round(m["due"] * 100) + d, m["note"]) for d in (-1, 0, 1)} & heard


def test_her_pedal_is_lifted_after_every_turn(monkeypatch, capsys, files, tmp_path):
    # a pedal-vocabulary model made to press the pedal and never lift it: each turn ends by --seconds, and
    # her pedal is up before the file plays on, in the context too
    M.save_checkpoint(tmp_path / "ped" / "ckpt.pt", small(1, vocab_size=T.PEDAL_VOCAB_SIZE))
    real = M.Aria.forward

    def forward(self, ids, *a, **kw):
        out = real(self, ids, *a, **kw)
        out[..., T.PED_ON_ID] += 30.0
        out[..., T.PED_OFF_ID] -= 30.0
        return out
    monkeypatch.setattr(M.Aria, "forward", forward)
    run = sim(monkeypatch, capsys, tmp_path, "--in", files / "six.mid", "--takeover", 2, "--turns", 2,
              "--seconds", 2, ckpt="ped")
    assert run.summary["turns"] == 2 and run.summary["stuck"] == 0
    pedal = [(m["sent"], m["value"]) for m in run.msgs if m["who"] == "aria" and m["type"] == "control_change"
             and m["control"] == 64]
    back = min(m["sent"] for m in note_ons(run.msgs, "pianist") if m["sent"] > 2.5)
    for lo, hi in ((2.0, back), (back, float("inf"))):
        turn = [v for t, v in pedal if lo <= t < hi]
        assert 127 in turn and turn[-1] == 0, pedal  # pressed, and lifted before the pianist plays on
    assert run.prompts[1].index(T.PED_OFF_ID) > run.prompts[1].index(T.PED_ON_ID)  # her lift, in the context


def test_her_release_never_cuts_a_key_the_pianist_holds():
    clock, rec = P.SimClock(), Recorder()
    pl = P.Player(rec, clock)
    wait = lambda s: [clock.sleep(0.002) for _ in range(round(s / 0.002))]  # noqa: E731
    offs = lambda: [m.note for _, m in rec.msgs if m.type == "note_off"]  # noqa: E731
    pedal = lambda: [(m.channel, m.value) for _, m in rec.msgs if m.type == "control_change"]  # noqa: E731
    pl.human(mido.Message("note_on", channel=0, note=60, velocity=70))  # the pianist holds C4 (local control)
    pl.note(0, 100, 60, 80, channel=1)  # Aria plays C4 and E4 on her own channel for 100 ms
    pl.note(0, 100, 64, 80, channel=1)
    wait(0.2)
    assert offs() == [64]  # E4 released, C4 kept: a note-off would silence the pianist's key
    pl.note(200, 2000, 67, 80, channel=1)
    pl.pedal_change(250, 1, channel=1)
    wait(0.1)
    pl.human(mido.Message("control_change", channel=0, control=64, value=127))  # their pedal down
    pl.human(mido.Message("note_on", channel=0, note=67, velocity=70))  # they take back the lead on G4
    pl.stop()
    assert offs() == [64] and not pl.busy() and pedal() == [(1, 127)]  # nothing of theirs cut, no pedal-up
    pl.human(mido.Message("note_off", channel=0, note=60))
    pl.human(mido.Message("note_off", channel=0, note=67))
    pl.human(mido.Message("control_change", channel=0, control=64, value=0))
    assert sorted(offs()) == [60, 64, 67] and pedal() == [(1, 127), (1, 0)]  # hers follow their release
    assert pl.close() == 0 and rec.left_on() == []


class FakeInput:
    """A MIDI input port whose messages reach the callback from their own thread at set times (s after
    opening), as a backend's do."""

    def __init__(self, callback, script):
        self.t0 = time.perf_counter()
        threading.Thread(target=self.play, args=(callback, script), daemon=True).start()

    def play(self, callback, script):
        for t, msg in script:
            time.sleep(max(0.0, self.t0 + t - time.perf_counter()))
            callback(msg)

    def close(self):
        pass


def test_times_are_stamped_as_messages_arrive(monkeypatch, files, tmp_path):
    # eight notes 150 ms apart while every prefill takes 0.3 s: each note keeps its own time in the context
    # and in the saved file (stamped in the input's thread, not when the loop gets to it)
    script = [(3.0 + 0.15 * i + d, mido.Message("note_on", note=60 + i, velocity=64 * (d == 0)))
              for i in range(8) for d in (0, 0.1)]
    script.append((4.5, mido.Message("control_change", control=67, value=127)))
    prompts, real = [], M.Aria.forward

    def forward(self, ids, *a, **kw):
        if ids.shape[1] > 1:
            time.sleep(0.3)
        return real(self, ids, *a, **kw)

    def generate(model, ids, *a, real_generate=S.generate, **kw):
        if kw.get("on_step"):
            prompts.append(list(ids))
        return real_generate(model, ids, *a, **kw)
    monkeypatch.setattr(M.Aria, "forward", forward)
    monkeypatch.setattr(S, "generate", generate)
    monkeypatch.setattr(P, "open_port", lambda name, kind, backend=None, callback=None:
                        FakeInput(callback, script) if kind == "input" else Recorder())
    assert L.main(live_args(files, "--in", "keys", "--out", "synth", "--turns", 1, "--seconds", 1,
                            "--save", tmp_path / "d.mid")) == 0
    onsets = [n[0] for n in T.detokenize_notes(prompts[0])[0]]
    assert len(onsets) == 8 and all(abs(b - a - 150) <= 20 for a, b in zip(onsets, onsets[1:])), onsets
    starts = [n[0] for n in T.load_midi(tmp_path / "d.mid").notes if n[4] == 0][:8]
    assert all(abs(b - a - 150) <= 20 for a, b in zip(starts, starts[1:])), starts


@pytest.fixture
def jack(monkeypatch):
    """A private JACK server on its dummy driver: virtual MIDI ports between processes, no sound card."""
    rtmidi = pytest.importorskip("rtmidi")
    if not shutil.which("jackd") or rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
        pytest.skip("needs jackd (Debian: jackd2) and python-rtmidi built with JACK")
    name = f"aria-test-{os.getpid()}"
    server = subprocess.Popen(["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", "48000",
                               "-p", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monkeypatch.setenv("JACK_DEFAULT_SERVER", name)
    backend = mido.Backend("mido.backends.rtmidi/UNIX_JACK")
    for _ in range(50):  # until the server answers
        try:
            backend.get_output_names()
            break
        except OSError:
            time.sleep(0.1)
    yield backend
    server.terminate()
    server.wait(timeout=10)


def test_a_duet_through_real_ports(jack, files, tmp_path):
    # another process plays into --in, hands over with the soft pedal, records Aria from --out, then Ctrl-C
    got = []
    keys = jack.open_output("keys", virtual=True, client_name="pianist")
    synth = jack.open_input("synth", virtual=True, client_name="piano",
                            callback=lambda m: got.append((time.perf_counter(), m)))
    inp = next(n for n in jack.get_input_names() if n.endswith(":keys"))
    out = next(n for n in jack.get_output_names() if n.endswith(":synth"))
    p = subprocess.Popen([sys.executable, str(ROOT / "live.py"), *live_args(
        files, "--backend", "mido.backends.rtmidi/UNIX_JACK", "--in", inp, "--out", out, "--seconds", 3,
        "--save", tmp_path / "duet.mid")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **ENV, "JACK_DEFAULT_SERVER": os.environ["JACK_DEFAULT_SERVER"]}, cwd=ROOT)
    assert any(line.startswith("listening") for line in iter(p.stdout.readline, ""))
    t0, script = time.perf_counter(), []
    for s, e, pitch, vel in phrase(0, 2.0):
        script += [(s, mido.Message("note_on", note=pitch, velocity=vel)),
                   (e, mido.Message("note_off", note=pitch))]
    script += [(2300, mido.Message("control_change", control=67, value=127)),
               (2500, mido.Message("control_change", control=67, value=0))]
    for t, msg in sorted(script, key=lambda x: x[0]):
        time.sleep(max(0.0, t0 + t / 1000 - time.perf_counter()))
        keys.send(msg)
    time.sleep(3.0)
    p.send_signal(signal.SIGINT)
    text, err = p.communicate(timeout=60)
    keys.close()
    synth.close()
    assert p.returncode == 0 and re.search(r"^\d+ notes in 1 turns, 0 late, 0 stuck", text, re.M), text + err
    aria = [(t - t0, m) for t, m in got if m.type == "note_on" and m.velocity]
    assert aria and 2.3 < aria[0][0] < 2.3 + 0.5  # her first note, half a second after the soft pedal at most
    assert left_on([{**m.dict(), "velocity": getattr(m, "velocity", 0)} for _, m in got]) == []
    assert [m.value for _, m in got if m.type == "control_change" and m.control == 64][-1] == 0
    assert [len(note_ons_in(t)) for t in mido.MidiFile(tmp_path / "duet.mid").tracks] == [8, len(aria)]
    starts = sorted(n[0] for n in T.load_midi(tmp_path / "duet.mid").notes)[:8]  # stamped as they arrived
    assert all(abs(b - a - 250) <= 15 for a, b in zip(starts, starts[1:])), starts


# -- sample.py --stream / --port / --seconds, generate's live parameters --------------------------------


def tiny(seed=0):
    return small(seed, max_seq_len=1024)


@torch.no_grad()
def test_prefilled_cache_gives_the_same_tokens():
    m, prompt = tiny(), T.tokenize(_mid(), dim=False, eos=False)
    ref = S.generate(m, prompt, 1, 60, seed=4)
    m.setup_cache(1, 1024)
    m(torch.tensor([prompt[:40]]), input_pos=0)  # what live.py does while the pianist plays
    assert S.generate(m, prompt, 1, 60, seed=4, prefilled=40) == ref
    with pytest.raises(ValueError, match="prefilled"):
        S.generate(m, prompt, 2, 10, prefilled=40)


def _mid():
    f = io.BytesIO()
    T.notes_to_midi([(*n, 0) for n in phrase(0, 6.0)], {0: 0}).save(file=f)
    return T.load_midi(f.getvalue())


@torch.no_grad()
def test_onset_floor_and_seconds():
    m, prompt = tiny(1), T.tokenize(_mid(), dim=False, eos=False)
    last = G.prompt_info(prompt)
    t_last = last[3] * T.SEGMENT_MS + (last[2] - T.ONSET_START) * T.TIME_STEP_MS
    row = S.generate(m, prompt, 1, 200, seed=0, min_onset_ms=(t_last % T.SEGMENT_MS) + 1500)[0]
    new = S.split_notes(row, len(prompt))[1]
    assert new and new[0][0] >= t_last + 1500
    for seed in range(3):
        row = S.generate(m, prompt, 1, 900, seed=seed, seconds=2.0, end=True)[0]
        new = S.split_notes(row, len(prompt))[1]
        # 2 s is less than ~100 tokens of music (30 tokens/s): the ending cue comes at once
        assert row[len(prompt)] == T.DIM_ID and row[-1] == T.EOS_ID
        assert sum(n[0] >= t_last + 2000 for n in new) == 1 and new[-1][0] >= t_last + 2000  # ends just after
        row = S.generate(m, prompt, 1, 300, seed=seed, seconds=60.0, end=True)[0]
        assert T.DIM_ID not in row[len(prompt):len(prompt) + 50]  # a minute away: no cue yet


@torch.no_grad()
def test_first_note_cap_bounds_her_leading_rest():
    # live.py's max_onset_ms: her first note at most 300 ms after the floor, however the model likes to rest
    m, prompt = tiny(3), T.tokenize(_mid(), dim=False, eos=False)
    info = G.prompt_info(prompt)
    floor = (info[2] - T.ONSET_START) * T.TIME_STEP_MS + 100  # ms into the prompt's last segment
    for seed in range(4):
        row = S.generate(m, prompt, 1, 12, seed=seed, temp=2.0, min_p=0.0, min_onset_ms=floor,
                         max_onset_ms=floor + 300, eos=False, dim=False)[0]
        first = S.split_notes(row, len(prompt))[1][0][0] - info[3] * T.SEGMENT_MS
        assert floor <= first <= floor + 300


def test_sample_stream_prints_each_note_and_port_plays_them(files, tmp_path, monkeypatch, capsys):
    write_midi(tmp_path / "p.mid", phrase(0, 3.0))
    rec = Recorder()
    monkeypatch.setattr(P, "open_port", lambda name, kind: rec)
    assert S.main([str(tmp_path / "p.mid"), "--ckpt", str(files / "run"), "--out", str(tmp_path / "o"),
                   "--stream", "--port", "Synth", "--seconds", "2", "--variations", "2", "--device", "cpu"]) \
        == 0
    out, err = capsys.readouterr()
    streamed = [json.loads(x) for x in out.splitlines()]  # stdout: JSON lines only; the log is on stderr
    for row in (1, 2):
        side = json.loads((tmp_path / "o" / f"p_{row}.json").read_text())
        new = S.split_notes(side["ids"], side["n_prompt_tokens"])[1]
        assert [(n["start_ms"], n["end_ms"], n["pitch"], n["velocity"]) for n in streamed
                if n.get("row") == row and "pitch" in n] == [n[:4] for n in new]  # every note, in order
    played = [m for _, m in rec.msgs if m.type == "note_on" and m.velocity]
    assert len(played) == len([n for n in streamed if n.get("row") == 1 and "pitch" in n])
    assert rec.left_on() == [] and "0 stuck" in err and "generated" in err


def test_stream_readers_that_leave_early_end_both_quietly(files, tmp_path):
    from test_tokenizer import first_line_then_close
    write_midi(tmp_path / "p.mid", phrase(0, 3.0))
    r = first_line_then_close([sys.executable, str(ROOT / "sample.py"), tmp_path / "p.mid", "--ckpt",
                               files / "run", "--stream", "--length", 600, "--out", tmp_path / "o",
                               "--device", "cpu", "--threads", "1"], env=ENV, cwd=ROOT)  # line, code, stderr
    assert "pitch" in json.loads(r[0]) and r[1] == 1 and "Traceback" not in r[2] and "Exception" not in r[2]
    r = first_line_then_close([sys.executable, str(ROOT / "live.py"), *live_args(
        files, "--in", files / "solo.mid", "--takeover", 1.0, "--out", "-")], env=ENV, cwd=ROOT)
    assert "due" in json.loads(r[0]) and r[1] == 1 and "Traceback" not in r[2] and "Exception" not in r[2]
    assert r[2].strip().splitlines()[-1].startswith("live.py: error: the output stopped taking messages")


@torch.no_grad()
def test_on_step_sees_each_rows_own_new_token():
    # prompts of different lengths: step i's token of a row sits at its own position
    m, a = tiny(2), T.tokenize(_mid(), dim=False, eos=False)
    b = a[:len(a) // 2]
    seen = [[], []]
    rows = S.generate(m, [a, b], 1, 30, seed=1,
                      on_step=lambda i, toks: [s.append(t) for s, t in zip(seen, toks)] and False)
    assert seen[0] == rows[0][len(a):len(a) + len(seen[0])]
    assert seen[1] == rows[1][len(b):len(b) + len(seen[1])]
