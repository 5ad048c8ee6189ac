"""reproduce.py --table 1 (the listening test of paper §4) through its CLI: the kit from held-out MIDI and a tiny
random model (clips, audio where FluidSynth is installed, the page, kit.json, key.json), the page answered end to end
in headless Chromium (skipped without it), the table from its CSV, the exact binomial p-values, the objective
metrics and the memorisation index; on real piano (/work/shared, skipped without it) the unrelated-piece floor."""
import csv
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import prepare  # noqa: E402
import reproduce as R  # noqa: E402
import tokenizer as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SF2 = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
AUDIO = bool(shutil.which("fluidsynth")) and SF2.is_file()


def reproduce(*args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--table", "1", *map(str, args)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    return r


def in_process(capsys, *args):
    """reproduce.main in this process (no interpreter and torch start-up): (exit status, stdout, stderr)."""
    status = R.main(["--table", "1", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def tiny_model(path, context=256):
    torch.manual_seed(0)
    M.save_checkpoint(path, M.Aria(dataclasses.replace(M.PRESETS["tiny"], max_seq_len=context)))  # random: fast


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """2 held-out prompts of 4 s + 8 s, 2 continuations of one model, the repeat in the test too: 3 systems."""
    tmp = tmp_path_factory.mktemp("t1")
    prepare.write_synthetic(4, tmp / "held_out", seed=1)
    prepare.write_synthetic(6, tmp / "train_midi", seed=2)
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), tmp / "train_midi", "--out", tmp / "data", "--workers", "0",
                    "--val_fraction", "0"], check=True, capture_output=True, env=ENV, cwd=ROOT)
    tiny_model(tmp / "tinyrandom.pt")
    r = reproduce("--prompts", tmp / "held_out", "--ckpt", tmp / "tinyrandom.pt", "--n_prompts", 2, "--n_continuations", 2,
                  "--prompt_seconds", 4, "--continuation_seconds", 8, "--trials", 5, "--with_repeat", "--metrics",
                  "--train", tmp / "data", "--out", tmp / "out", "--device", "cpu")
    t1 = tmp / "out" / "table1"
    return dict(tmp=tmp, t1=t1, log=r.stdout, kit=json.loads((t1 / "kit.json").read_text()),
                key=json.loads((t1 / "key.json").read_text()))


def clip_notes(path):
    return sorted(T.load_midi(path).notes)  # (start, end, pitch, velocity, channel); 1 tick = 1 ms


def test_kit_clips_are_prompt_plus_exactly_the_continuation_and_anonymous(kit):
    t1, key, k = kit["t1"], kit["key"], kit["kit"]
    assert key["systems"] == ["tinyrandom", "ground_truth", "repeat"] and k["trials"] == 6  # 5 -> every pair twice
    assert len(key["clips"]) == 2 * (2 + 1 + 1) == len(list((t1 / "clips").glob("*.mid")))
    assert all(len(c) == 6 and int(c, 16) >= 0 for c in key["clips"])
    for c in key["clips"]:
        assert abs(mido.MidiFile(t1 / "clips" / f"{c}.mid").length - 12.0) < 1e-6  # every clip exactly 4 + 8 s
        assert all(n[0] < 12000 and n[1] <= 12000 for n in clip_notes(t1 / "clips" / f"{c}.mid"))
    for p, prompt in enumerate(k["prompts"], 1):
        clips = {c: clip_notes(t1 / "clips" / f"{c}.mid") for c, v in key["clips"].items() if v["prompt"] == p}
        head = Counter((s, pitch) for s, _, pitch, _, _ in T.detokenize_notes(T.prompt(prompt["file"], (round(prompt["offset_s"] * 1000) + 4000) / 1000))[0])
        assert len(head) > 3 and all(not head - Counter((s, pitch) for s, _, pitch, _, _ in notes) for notes in clips.values())
        gt = next(notes for c, notes in clips.items() if key["clips"][c]["system"] == "ground_truth")
        real = T.detokenize_notes(T.prompt(prompt["file"], (round(prompt["offset_s"] * 1000) + 12000) / 1000))[0]
        assert sorted((s, pitch) for s, _, pitch, _, _ in gt) == sorted((s, pitch) for s, _, pitch, _, _ in real if s < 12000)
    # the random model cannot reach 8 s in its 256-token context: said once per prompt and recorded
    runs = k["checkpoints"][0]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["reached"] == [False, False] for r in runs)
    assert kit["log"].count("stop short of 8 s") == 2
    page = (t1 / "index.html").read_text()
    assert not any(s in page for s in key["systems"] + ["key.json", "tinyrandom"])
    assert bool(k["audio"]) == AUDIO


@pytest.mark.skipif(not AUDIO, reason="no FluidSynth or GM sound font (apt-get install fluidsynth fluid-soundfont-gm)")
def test_audio_is_loudness_matched(kit):
    t1, audio = kit["t1"], kit["kit"]["audio"]
    assert sorted(p.stem for p in (t1 / "audio").glob("*.ogg")) == sorted(kit["key"]["clips"]) == sorted(audio["clips"])
    assert sum(p.stat().st_size for p in (t1 / "audio").glob("*.ogg")) < 8 * 300_000  # 12-s Ogg clips are small
    assert audio["target_dbfs"] <= R.TARGET_DBFS
    levels = []
    for c in sorted(audio["clips"], key=lambda c: audio["clips"][c]["level_dbfs"])[::7]:  # the quietest, the loudest
        raw = kit["tmp"] / f"{c}.raw"  # render again at the recorded gain: each lands on the target, unclipped
        subprocess.run(["fluidsynth", "-ni", "-q", "-r", "22050", "-g", str(audio["clips"][c]["gain"]), "-F", raw,
                        "-T", "raw", SF2, t1 / "clips" / f"{c}.mid"], check=True, capture_output=True)
        x = np.fromfile(raw, np.int16) / 32768
        power = (x[:len(x) // 4410 * 4410] ** 2).reshape(-1, 4410).mean(1)
        levels.append(10 * np.log10(power[power > 1e-6].mean()))
        assert 20 * np.log10(np.abs(x).max()) < -0.5
    assert max(v["level_dbfs"] for v in audio["clips"].values()) - min(v["level_dbfs"] for v in audio["clips"].values()) > 1
    assert np.allclose(levels, audio["target_dbfs"], atol=0.3), levels


def test_binomial_p_values_are_exact():
    assert R.binom_p(30, 10) == R.binom_p(10, 30) == pytest.approx(2 * 1221246132 / 2 ** 40)  # sum C(40, k<=10)
    assert R.binom_p(30, 10) == pytest.approx(0.0022214, rel=1e-4)
    for _, wins, ties, losses, p in R.PAPER_T1:
        assert f"{R.binom_p(wins, losses):.2e}" == f"{p:.2e}"  # the paper's own rows (ties left out)
    assert R.binom_p(5, 5) == R.binom_p(0, 0) == R.binom_p(1, 0) == 1.0


def browser(download_dir):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chrome or not shutil.which("chromedriver"):
        pytest.skip("no Chromium and chromedriver (apt-get install chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={download_dir.parent / 'profile'}"):
        o.add_argument(a)
    o.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    return webdriver.Chrome(options=o, service=Service(shutil.which("chromedriver")))


def test_page_in_chromium_answers_every_trial_and_exports_the_csv(kit, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    t1, key, n = kit["t1"], kit["key"], kit["kit"]["trials"]
    d = browser(tmp_path / "downloads")
    try:
        d.get((t1 / "index.html").as_uri())
        text = d.find_element(By.TAG_NAME, "body").text
        for criterion in ("melodic development", "rhythmic structure", "harmonic progression", "stylistic coherence"):
            assert criterion in text
        d.find_element(By.ID, "start").click()  # no id yet: an alert, not a start
        assert "listener id" in d.find_element(By.ID, "start-error").text and d.find_element(By.ID, "trial").get_attribute("hidden")
        d.find_element(By.ID, "listener").send_keys("Ann, B.")  # a comma: the CSV must quote it
        d.find_element(By.ID, "training").send_keys("3")
        d.find_element(By.ID, "start").click()
        chosen = []
        for k in range(n):
            if k == 2:  # leave and come back: the answers so far are kept in the browser
                d.refresh()
            assert d.find_element(By.ID, "trial-n").text == str(k + 1)
            assert d.find_element(By.ID, "progress").get_attribute("value") == str(k)
            for _ in range(20):  # the live region announces each trial (after a beat, so screen readers notice)
                if f"Trial {k + 1} of {n}" in d.find_element(By.ID, "status").get_attribute("textContent"):
                    break
                time.sleep(0.05)
            assert f"Trial {k + 1} of {n}" in d.find_element(By.ID, "status").get_attribute("textContent")
            if AUDIO and k == 0:
                d.execute_script("const a = document.getElementById('audio-a'); a.preload = 'metadata'; a.load();")
                for _ in range(50):
                    if (d.execute_script("return document.getElementById('audio-a').duration") or 0) > 0:
                        break
                    time.sleep(0.1)
                assert abs(d.execute_script("return document.getElementById('audio-a').duration") - 12) < 3
            choice = ["A", "tie", "B"][k % 3]
            if k % 2:  # by keyboard: A, T, B
                ActionChains(d).send_keys(choice[0].lower()).perform()
            else:
                d.find_element(By.CSS_SELECTOR, f'[data-choice="{choice}"]').click()
            chosen.append(choice)
        assert not d.find_element(By.ID, "done").get_attribute("hidden")
        d.find_element(By.ID, "download").click()
        for _ in range(50):
            files = list((tmp_path / "downloads").glob("*.csv"))
            if files:
                break
            time.sleep(0.1)
        exported = files[0].read_text()
        assert exported == d.find_element(By.ID, "csv").get_attribute("value")
        assert not any(s in d.page_source for s in key["systems"])
    finally:
        d.quit()
    rows = list(csv.DictReader(exported.splitlines()))
    assert list(rows[0]) == R.COLUMNS and len(rows) == n == 6
    assert [r["choice"] for r in rows] == chosen and [r["trial"] for r in rows] == [str(k) for k in range(1, n + 1)]
    assert {(r["listener"], r["training"]) for r in rows} == {("Ann, B.", "3")}
    assert all(float(r["seconds"]) >= 0 for r in rows)
    clips = key["clips"]
    pairs = Counter(tuple(sorted((clips[r["clip_a"]]["system"], clips[r["clip_b"]]["system"]))) for r in rows)
    assert sorted(pairs.values()) == [2, 2, 2] and all(a != b for a, b in pairs)  # every pair equally often
    assert all(clips[r["clip_a"]]["prompt"] == clips[r["clip_b"]]["prompt"] for r in rows)
    prompts = Counter((tuple(sorted((clips[r["clip_a"]]["system"], clips[r["clip_b"]]["system"]))),
                       clips[r["clip_a"]]["prompt"]) for r in rows)
    assert set(prompts.values()) == {1}  # each pair meets each prompt once
    # the table from this CSV: per pair, the first system's wins / ties / losses and the exact p-value
    (tmp_path / "ann.csv").write_text(exported)
    r = reproduce("--answers", tmp_path / "ann.csv", "--out", t1.parent)
    res = json.loads((t1 / "results.json").read_text())
    assert res["listeners"] == 1 and res["answers"] == n and "| system | against |" in r.stdout
    for row in res["rows"]:
        mine = [x for x in rows if {clips[x["clip_a"]]["system"], clips[x["clip_b"]]["system"]} == {row["system"], row["against"]}]
        won = sum(x["choice"] != "tie" and clips[x["clip_" + x["choice"].lower()]]["system"] == row["system"] for x in mine)
        ties = sum(x["choice"] == "tie" for x in mine)
        assert (row["wins"], row["ties"], row["losses"]) == (won, ties, len(mine) - won - ties)
        assert row["p"] == R.binom_p(won, len(mine) - won - ties)
    assert [p["p"] for p in res["paper"]] == [p[-1] for p in R.PAPER_T1]


def test_table_from_answers(kit, tmp_path, capsys):
    """Two listeners' CSVs with known choices -> Table 1's rows; the novice (under a year of training) left out."""
    clips = kit["key"]["clips"]
    model, gt = ([c for c, v in clips.items() if v["system"] == s and v["prompt"] == 1] for s in ("tinyrandom", "ground_truth"))
    choices = ["A"] * 7 + ["tie"] + ["B"] * 2  # the model on side A, then the sides swapped: the same outcome
    ann = [("Ann", 4, k + 1, model[0], gt[0], c, 12.5) for k, c in enumerate(choices)]
    ann += [("Novice", 0.5, k + 1, model[0], gt[0], "B", 3) for k in range(5)]
    bob = [("Bob", 2, k + 1, gt[0], model[1], {"A": "B", "B": "A"}.get(c, c), 9) for k, c in enumerate(choices)]
    for name, rows in (("ann", ann), ("bob", bob)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([R.COLUMNS] + rows)
    status, out, _ = in_process(capsys, "--answers", tmp_path / "ann.csv", tmp_path / "bob.csv", "--out", kit["t1"].parent)
    res = json.loads((kit["t1"] / "results.json").read_text())
    assert status == 0 and res["listeners"] == 2 and res["answers"] == 20 and res["left_out"] == ["Novice"]
    assert res["rows"] == [dict(system="tinyrandom", against="ground_truth", wins=14, ties=2, losses=4, p=R.binom_p(14, 4))]
    assert "| tinyrandom | ground_truth | 14 | 2 | 4 | 3.09e-02 |" in out
    assert (kit["t1"] / "results.md").read_text().startswith("# Table 1: the listening test")


def test_user_mistakes_are_one_line_errors(kit, tmp_path, capsys):
    t1, clip = kit["t1"], next(iter(kit["key"]["clips"]))
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(R.COLUMNS) + f"\nL,2,1,{clip},zzzzzz,A,3.1\n")
    short = tmp_path / "short"
    short.mkdir()
    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=64), mido.Message("note_off", note=60, time=480)]))
    mid.save(short / "one_note.mid")
    cases = [(["--answers", bad, "--out", t1.parent], "line 2: clip id 'zzzzzz' is not in"),
             (["--answers", tmp_path / "none.csv", "--out", t1.parent], "no such file"),
             (["--metrics", "--out", tmp_path / "nothing"], "no listening-test kit here"),
             (["--prompts", tmp_path / "missing", "--ckpt", "x.pt", "--out", tmp_path / "o"], "no such folder"),
             (["--prompts", short, "--ckpt", kit["tmp"] / "tinyrandom.pt", "--out", tmp_path / "o"], "0 of 1 MIDI files"),
             (["--prompts", short, "--ckpt", "x.pt", "--out", t1.parent], "holds a kit"),
             ([], "--table 1 needs")]
    r = reproduce(*cases[0][0], ok=False)  # through the CLI once, the others in this process
    assert r.returncode == 1 and r.stderr.startswith("reproduce.py: ") and cases[0][1] in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for args, message in cases[1:]:
        status, _, err = in_process(capsys, *args)
        assert status == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_metrics_overlap_and_references(kit):
    res = json.loads((kit["t1"] / "metrics.json").read_text())
    assert list(res["oa"]) == ["tinyrandom", "repeat", "unrelated (floor)", "ground truth halves"]
    for row in res["oa"].values():
        assert list(row) == R.FEATURES and all(0 <= v <= 1.0001 for f in row.values() for v in f["per_prompt"])
    rng = np.random.default_rng(0)
    x = rng.normal(60, 5, 300)
    assert R.overlap(x, x, "pitch") == pytest.approx(1, abs=1e-3)
    assert R.overlap(x, x + 100, "pitch") < 1e-6 and R.overlap(x, x[:0], "pitch") == 0
    assert R.overlap(np.array([0, 4, 7.]), np.array([0, 4, 7.]), "pitch_class") == pytest.approx(1)
    assert R.overlap(np.array([0, 4, 7.]), np.array([1, 5, 8.]), "pitch_class") == 0
    mem = res["memorisation"]
    assert mem["train_files"] == len(np.load(kit["tmp"] / "data" / "train.idx.npy")) - 1 > 3
    assert set(mem["longest_copy"]) == {"tinyrandom", "ground_truth", "repeat"}


def test_memorisation_reports_the_copied_stretch_exactly(kit):
    index, files = R.ngram_index(kit["tmp"] / "data")
    ids = np.fromfile(kit["tmp"] / "data" / "train.bin", dtype=np.uint16)
    idx = np.load(kit["tmp"] / "data" / "train.idx.npy")
    source = sorted(T.detokenize_notes(ids[idx[3]:idx[4]].tolist())[0], key=lambda n: (n[0], n[2]))
    rng = random.Random(0)
    for m in (8, 23, 61):
        before = [(50 * k + 7, 50 * k + 40, rng.randint(20, 30), 64, 0) for k in range(10)]  # unlike the pieces
        after = [(90_000 + 70 * k, 90_000 + 70 * k + 30, rng.randint(100, 110), 64, 0) for k in range(10)]
        copied = [(s + 700, e + 700, p + 3, v, c) for s, e, p, v, c in source[20:20 + m]]  # moved and transposed
        assert R.longest_copy(before + copied + after, index) == m
    assert R.longest_copy(before + after, index) == 0 and R.longest_copy([], index) == 0


@pytest.mark.skipif(not (SHARED / "data" / "pop909").is_dir(), reason="needs /work/shared (real piano MIDI)")
def test_on_real_piano_the_unrelated_floor_is_below_the_references(tmp_path):
    tiny_model(tmp_path / "m.pt", context=512)  # a 15-s pop909 prompt takes up to ~300 tokens
    reproduce("--prompts", SHARED / "data" / "pop909", "--ckpt", tmp_path / "m.pt", "--n_continuations", 1,
              "--soundfont", "none", "--metrics", "--out", tmp_path / "out", "--device", "cpu")
    oa = json.loads((tmp_path / "out" / "table1" / "metrics.json").read_text())["oa"]
    assert len(oa["unrelated (floor)"]["pitch"]["per_prompt"]) == 5
    for f in ("pitch_class", "ioi"):
        floor = oa["unrelated (floor)"][f]["mean"]
        assert floor < oa["ground truth halves"][f]["mean"] and floor < oa["repeat"][f]["mean"], (f, oa)
