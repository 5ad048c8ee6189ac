"""live.py (the duet) and sample.py's live options (--stream, --port, --seconds), on CPU with a
MIDI file as the pianist and a recording stand-in for the output port: takeover latency, notes in
order and on time, the pianist taking back the lead, lateness counted when the model is slower
than the music, all notes off on every way out, one-line errors for ports."""
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mido
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import live as L  # noqa: E402
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


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    torch.manual_seed(0)
    M.save_checkpoint(d / "run" / "ckpt.pt", M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=2048)).eval())
    write_midi(d / "solo.mid", phrase(0, 2.0), [(0, 1), (1500, 0)])
    # plays 0-1.5 s, rests, plays again at 4 s: with --pause 0.5 Aria takes over at ~2 s and is interrupted at 4 s
    write_midi(d / "gap.mid", phrase(0, 1.5) + phrase(4000, 1.0))
    return d


def duet(files, *args, **kw):
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), "--ckpt", str(files / "run"), "--device", "cpu",
                        "--out", "-", "--threads", "1", *map(str, args)], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=kw.get("timeout", 120))
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return r, [x for x in lines if "summary" not in x], (lines[-1] if lines and "summary" in lines[-1] else None)


def note_ons(msgs, who):
    return [m for m in msgs if m["type"] == "note_on" and m["velocity"] > 0 and m["who"] == who]


def left_on(msgs):
    on = {}
    for m in msgs:
        if m["type"] in ("note_on", "note_off"):
            on[m["channel"], m["note"]] = m["type"] == "note_on" and m["velocity"] > 0
    return [k for k, v in on.items() if v]


def test_file_duet_takes_over_fast_and_plays_on_time(files):
    r, msgs, summary = duet(files, "--in", files / "solo.mid", "--takeover", 2.0, "--seconds", 3)
    assert r.returncode == 0, r.stderr
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


def test_pianist_takes_back_the_lead(files):
    r, msgs, summary = duet(files, "--in", files / "gap.mid", "--pause", 0.5, "--turns", 2, "--seconds", 8)
    assert r.returncode == 0, r.stderr
    back = next(m["sent"] for m in note_ons(msgs, "pianist") if m["sent"] > 3.5)  # the file plays again at 4 s
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
            if slow:  # dense music: the earliest onset the grammar allows (chords), so the slow model falls behind
                out[..., T.ONSET_START:T.ONSET_START + 500] -= torch.arange(500.0)
            return out
        model.forward = step
        return model, path
    monkeypatch.setattr(S, "load_lm", load)
    monkeypatch.setattr(P, "open_port", lambda name, kind, *args, **kw: recorder)
    return L.main(["--ckpt", str(files / "run"), "--device", "cpu", "--threads", "1", "--out", "port", *map(str, args)])


def test_late_notes_are_counted_and_played_when_the_model_is_slow(monkeypatch, files, capsys):
    rec = Recorder()
    assert run_live(monkeypatch, files, rec, "--in", files / "solo.mid", "--takeover", 1.0, "--seconds", 4,
                    "--length", 90, slow=0.05) == 0  # 3 steps a note at 50 ms, notes in chords
    out = capsys.readouterr().out
    notes, late = (int(x) for x in re.search(r"^(\d+) notes in \d+ turns, (\d+) late", out, re.M).groups())
    assert notes > 3 and late > 0, out  # counted, and every decoded note was still played
    assert "0 stuck" in out and rec.left_on() == []


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt, 0), (RuntimeError, 1)], ids=["ctrl-c", "error"])
def test_all_notes_off_on_the_way_out(monkeypatch, files, capsys, exc, code):
    rec = Recorder()
    if code == 0:
        assert run_live(monkeypatch, files, rec, "--in", files / "solo.mid", "--takeover", 1.0, "--lookahead", 3,
                        fail_at=40, exc=exc) == 0
    else:
        with pytest.raises(P.LiveError, match="RuntimeError: boom"):
            run_live(monkeypatch, files, rec, "--in", files / "solo.mid", "--takeover", 1.0, "--lookahead", 3,
                     fail_at=40, exc=exc)
    assert any(m.type == "note_on" and m.velocity for _, m in rec.msgs)
    assert rec.left_on() == [] and rec.msgs[-1][1].type == "control_change" and rec.msgs[-1][1].value == 0


def test_a_vanished_port_is_one_line(monkeypatch, files):
    with pytest.raises(P.LiveError, match="the output stopped taking messages"):
        run_live(monkeypatch, files, Recorder(fail_after=5), "--in", files / "solo.mid", "--takeover", 1.0,
                 "--seconds", 2)


def test_port_errors_are_one_line(files, monkeypatch):
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), "--in", "Nope"], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("live.py: error:"), r.stderr
    assert "python-rtmidi" in r.stderr or "no MIDI input named 'Nope'" in r.stderr
    monkeypatch.setattr(mido, "get_output_names", lambda: ["Synth A", "Synth B"])
    with pytest.raises(P.LiveError, match="no MIDI output named 'X'; outputs: 'Synth A', 'Synth B'"):
        P.open_port("X", "output")
    r = subprocess.run([sys.executable, str(ROOT / "live.py"), "--in", files / "missing.mid"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.mid" in r.stderr


# -- sample.py --stream / --port / --seconds, generate's live parameters --------------------------------


def tiny(seed=0):
    torch.manual_seed(seed)
    return M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=1024)).eval()


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
    last = S.prompt_info(prompt)
    t_last = last[3] * T.SEGMENT_MS + (last[2] - T.ONSET_START) * T.TIME_STEP_MS
    row = S.generate(m, prompt, 1, 200, seed=0, min_onset_ms=(t_last % T.SEGMENT_MS) + 1500)[0]
    new = S.split_notes(row, len(prompt))[1]
    assert new and new[0][0] >= t_last + 1500
    for seed in range(3):
        row = S.generate(m, prompt, 1, 900, seed=seed, seconds=2.0, end=True)[0]
        new = S.split_notes(row, len(prompt))[1]
        # 2 s is less than ~100 tokens of music (30 tokens/s): the ending cue comes at once
        assert row[len(prompt)] == T.DIM_ID and row[-1] == T.EOS_ID
        assert sum(n[0] >= t_last + 2000 for n in new) == 1 and new[-1][0] >= t_last + 2000  # ends right after
        row = S.generate(m, prompt, 1, 300, seed=seed, seconds=60.0, end=True)[0]
        assert T.DIM_ID not in row[len(prompt):len(prompt) + 50]  # a minute away: no cue yet


def test_sample_stream_prints_each_note_and_port_plays_them(files, tmp_path, monkeypatch, capsys):
    write_midi(tmp_path / "p.mid", phrase(0, 3.0))
    rec = Recorder()
    monkeypatch.setattr(P, "open_port", lambda name, kind: rec)
    assert S.main([str(tmp_path / "p.mid"), "--ckpt", str(files / "run"), "--out", str(tmp_path / "o"), "--stream",
                   "--port", "Synth", "--seconds", "2", "--variations", "2", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    streamed = [json.loads(x) for x in out.splitlines()]  # stdout: JSON lines only; the log is on stderr
    for row in (1, 2):
        side = json.loads((tmp_path / "o" / f"p_{row}.json").read_text())
        new = S.split_notes(side["ids"], side["n_prompt_tokens"])[1]
        assert [(n["start_ms"], n["end_ms"], n["pitch"], n["velocity"]) for n in streamed if n.get("row") == row
                and "pitch" in n] == [n[:4] for n in new]  # every note, as the file has it, in order
    played = [m for _, m in rec.msgs if m.type == "note_on" and m.velocity]
    assert len(played) == len([n for n in streamed if n.get("row") == 1 and "pitch" in n]) and rec.left_on() == []
    assert "0 stuck" in err and "generated" in err



def test_stream_readers_that_leave_early_end_both_quietly(files, tmp_path):
    from test_tokenizer import first_line_then_close
    write_midi(tmp_path / "p.mid", phrase(0, 3.0))
    line, code, err = first_line_then_close([sys.executable, str(ROOT / "sample.py"), tmp_path / "p.mid", "--ckpt",
                                             files / "run", "--stream", "--length", 600, "--out", tmp_path / "o",
                                             "--device", "cpu", "--threads", "1"], env=ENV, cwd=ROOT)
    assert "pitch" in json.loads(line) and code == 1 and "Traceback" not in err and "Exception" not in err
    line, code, err = first_line_then_close([sys.executable, str(ROOT / "live.py"), "--ckpt", files / "run", "--in",
                                             files / "solo.mid", "--takeover", 1.0, "--out", "-", "--device", "cpu",
                                             "--threads", "1"], env=ENV, cwd=ROOT)
    assert "due" in json.loads(line) and code == 1 and "Traceback" not in err and "Exception" not in err
    assert err.strip().splitlines()[-1].startswith("live.py: error: the output stopped taking messages")

@torch.no_grad()
def test_on_step_sees_each_rows_own_new_token():
    # prompts of different lengths: step i's token of a row sits at its own position
    m, a = tiny(2), T.tokenize(_mid(), dim=False, eos=False)
    b = a[:len(a) // 2]
    seen = [[], []]
    rows = S.generate(m, [a, b], 1, 30, seed=1, on_step=lambda i, toks: [s.append(t) for s, t in zip(seen, toks)] and False)
    assert seen[0] == rows[0][len(a):len(a) + len(seen[0])] and seen[1] == rows[1][len(b):len(b) + len(seen[1])]
