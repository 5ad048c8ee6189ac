"""finetune_cls.py: learning end to end through the CLI, --predict, slicing, the official slice
aggregation, balanced subsets, stratified splits, exact resume, DDP, bad labels, and a few real
Pianist8 files (skipped when ../shared/data/pianist8 is absent). CPU only."""
import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_cls as FC  # noqa: E402
import model as M  # noqa: E402
import tokenizer as T  # noqa: E402
import training as TR  # noqa: E402

PIANIST8 = ROOT.parent / "shared" / "data" / "pianist8"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONWARNINGS": "ignore"}
# tiny model, short slices, a high learning rate: learns the toy task below in a few dozen steps
FAST = ["--preset", "tiny", "--slice_len", "128", "--batch_size", "8", "--lr", "2e-3", "--log_interval", "1",
        "--workers", "0", "--device", "cpu"]
REGISTERS = {"low": (28, 52), "mid": (53, 72), "high": (73, 98)}  # three classes, told apart by pitch range


def run(*args, ok=True, timeout=300):
    r = subprocess.run([sys.executable, str(ROOT / "finetune_cls.py"), *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=timeout, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def losses(out):
    return {d["step"]: d["loss"] for d in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in d}


def piece(rng, lo, hi, n_notes):
    mid = mido.MidiFile(type=0, ticks_per_beat=500)  # 1 tick = 1 ms at the default tempo
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)])
    events, t = [], 0
    for _ in range(n_notes):
        p, d = rng.randint(lo, hi), rng.choice([100, 200, 300])
        events += [(t, 1, mido.Message("note_on", note=p, velocity=rng.randint(40, 100))),
                   (t + d, 0, mido.Message("note_off", note=p))]
        t += rng.choice([100, 150, 250])
    events.sort(key=lambda e: (e[0], e[1]))
    now = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    mid.tracks.append(track)
    return mid


def write_csv(path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """8 files per register class (5 train, 2 valid, 1 test), 60-160 notes each: several 128-token
    slices per file. Paths in labels.csv are relative to its folder."""
    folder = tmp_path_factory.mktemp("toy")
    (folder / "midi").mkdir()
    rng, rows = random.Random(0), []
    for c, (lo, hi) in REGISTERS.items():
        for i in range(8):
            name = f"midi/{c}_{i}.mid"
            piece(rng, lo, hi, rng.randint(60, 160)).save(folder / name)
            rows.append((name, c, "train" if i < 5 else "valid" if i < 7 else "test"))
    write_csv(folder / "labels.csv", rows)
    write_csv(folder / "nosplit.csv", [r[:2] for r in rows], header=("path", "label"))
    return folder


# -- end to end ----------------------------------------------------------------------------

def test_learns_reports_and_predicts(toy, tmp_path):
    # an unreadable file is reported and skipped; the run goes on
    (toy / "midi" / "junk.mid").write_bytes(b"not a midi file")
    csv_path = write_csv(tmp_path / "labels.csv", [(str(toy / r[0]), r[1], r[2]) for r in
                                                   csv.reader(open(toy / "labels.csv"))][1:] +
                         [(str(toy / "midi" / "junk.mid"), "low", "train")])
    out = tmp_path / "run"
    r = run("--labels", csv_path, "--out", out, *FAST, "--epochs", "5")
    assert "junk.mid" in r.stderr and "skipping" in r.stderr and "Traceback" not in r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["classes"] == ["high", "low", "mid"] and res["files"] == {"train": 15, "valid": 6, "test": 3}
    assert len(res["skipped"]) == 1 and res["selected_on"] == "valid"
    spe = res["steps_per_epoch"]
    assert [e["step"] for e in res["epochs"]] == [spe * k for k in range(1, 6)]
    for e in res["epochs"]:
        for split in ("valid", "test"):
            m = e[split]
            assert set(m) == {"accuracy", "macro_f1", "n_files", "per_class", "confusion"}
            assert set(m["per_class"]) == set(res["classes"]) and np.sum(m["confusion"]) == m["n_files"]
            assert set(m["per_class"]["low"]) == {"precision", "recall", "f1", "support"}
    best = res["best"]
    assert best["valid"]["accuracy"] == max(e["valid"]["accuracy"] for e in res["epochs"])
    assert best["valid"]["accuracy"] >= 0.8, res["epochs"]  # chance is 1/3
    assert best["test"] == next(e["test"] for e in res["epochs"] if e["step"] == best["step"])
    loss = losses(out)
    assert np.mean([loss[s] for s in range(1, 6)]) - np.mean([loss[s] for s in range(5 * spe - 4, 5 * spe + 1)]) > 0.3
    # stdout has the per-epoch report: accuracy and macro-F1 of each split
    assert r.stdout.count("  valid: accuracy") == 5 and r.stdout.count("  test: accuracy") == 5
    assert "best epoch" in r.stdout
    # the checkpoint carries the class names; --predict uses best.pt
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["classes"] == res["classes"] and ckpt["step"] == 5 * spe
    assert torch.load(out / "best.pt", weights_only=True)["step"] == best["step"]
    files = [toy / "midi" / f"{c}_{i}.mid" for c in REGISTERS for i in (5, 6)]
    r = run("--ckpt", out, "--predict", *files, toy / "midi" / "junk.mid", "--device", "cpu", ok=False)
    assert r.returncode == 1 and "junk.mid" in r.stderr and "Traceback" not in r.stderr
    lines = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert [Path(line[0]).name for line in lines] == [f.name for f in files]
    assert all(label in res["classes"] and 1 / 3 <= float(p) <= 1 for _, label, p in lines)
    right = sum(label == Path(f).name.split("_")[0] for f, label, _ in lines)
    assert round(right / len(lines), 4) == best["valid"]["accuracy"]  # the valid files, best epoch's weights


def test_resume_is_exact(toy, tmp_path):
    # no split column (stratified split), a 6-file balanced subset, dropout on; the stop falls
    # mid-epoch and max_iters ends mid-epoch
    args = ["--labels", toy / "nosplit.csv", *FAST, "--n_train", "6", "--max_iters", "7", "--ckpt_interval", "2"]
    run(*args, "--out", tmp_path / "full")
    run(*args, "--out", tmp_path / "split", "--stop_at", "4")
    r = run("--out", tmp_path / "split", "--resume", "--device", "cpu")  # nothing else but the per-run device
    assert "resuming" in r.stdout and "at step 4" in r.stdout
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 8))
    assert [split[s] for s in range(1, 8)] == [full[s] for s in range(1, 8)]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "split"))
    assert a["split"] == "stratified" and a["files"] == {"train": 6, "valid": 3, "test": 3}
    spe = a["steps_per_epoch"]
    assert 7 % spe and [e["step"] for e in a["epochs"]] == list(range(spe, 7, spe)) + [7]
    assert a["epochs"] == b["epochs"] and a["best"] == b["best"]


def test_ddp_two_gloo_processes_match_one(toy, tmp_path):
    # dropout off: the two ranks would draw other masks than one process with two micro-batches
    args = ["--labels", toy / "labels.csv", *FAST, "--max_iters", "2", "--resid_dropout", "0"]
    run(*args, "--out", tmp_path / "one", "--batch_size", "8", "--micro_batch", "4")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        str(ROOT / "finetune_cls.py"), *map(str, args), "--batch_size", "4", "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("step 1 |") == 1  # only rank 0 prints
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() and all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["epochs"] for d in ("one", "two"))
    assert [e["valid"]["confusion"] for e in a] == [e["valid"]["confusion"] for e in b]  # sharded evaluation


# -- units ---------------------------------------------------------------------------------

def test_slices_cover_the_file_and_end_in_eos(toy):
    ids = T.tokenize(toy / "midi" / "high_0.mid", dim=False)
    head = ids[:ids.index(T.BOS_ID) + 1]
    body = ids[len(head):-1]
    for L in (64, 100, 128, 4096):
        slices = FC.make_slices(ids, L)
        n = -(-len(body) // (L - len(head) - 1))
        assert n <= len(slices) <= n + 1  # about equal slices (cuts move back to event starts)
        assert all(len(s) <= L and s[-1] == T.EOS_ID and list(s[:len(head)]) == head for s in slices)
        parts = [list(s[len(head):-1]) for s in slices]
        assert sum(parts, []) == body  # nothing lost, nothing repeated
        for p in parts[1:]:  # every cut before an event (note, drum) or a <T>, never inside one
            assert T.TOKEN_CLASS[p[0]] in (T.NOTE, T.DRUM) or p[0] == T.SEG_ID
    assert len(FC.make_slices(ids, 4096)) == 1 and list(FC.make_slices(ids, 4096)[0]) == ids
    with pytest.raises(ValueError):
        FC.make_slices(ids, 10)


def test_slice_aggregation_is_the_official_rule():
    # by hand: softmax at each slice's <E>, weighted by its non-pad length, summed; the model's
    # slices of different lengths batched with padding vs one by one
    torch.manual_seed(0)
    model = M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, class_size=3)).eval()
    rng = np.random.default_rng(0)
    files = [[np.concatenate([[T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID], rng.integers(T.NOTE_START, 17000, n),
                              [T.EOS_ID]]).astype(np.uint16) for n in ns] for ns in ([50, 120, 7], [90], [30, 31])]
    got = FC.predict_files(model, files, torch.device("cpu"), batch_size=2)
    for f, slices in enumerate(files):
        with torch.no_grad():
            sp = torch.stack([model(torch.tensor(s.astype(np.int64))[None])[0, -1].softmax(-1) for s in slices])
        want = (sp.double() * torch.tensor([len(s) for s in slices], dtype=torch.float64)[:, None]).sum(0)
        assert torch.allclose(got[f], want / want.sum(), atol=1e-5)


def test_balanced_subset():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 5 + ["d"] * 20
    for n in (4, 10, 19, 20):
        idx = FC.balanced_subset(labels, n, seed=0)
        counts = Counter(labels[i] for i in idx)
        assert len(idx) == len(set(idx)) == n and set(counts) == {"a", "b", "c", "d"}
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
    counts = Counter(labels[i] for i in FC.balanced_subset(labels, 41, seed=0))
    assert counts["c"] == 5 and {counts[k] for k in "abd"} == {12}  # c runs out, the others fill up
    assert FC.balanced_subset(labels, 23, 0) == FC.balanced_subset(labels, 23, 0)  # deterministic
    assert FC.balanced_subset(labels, 23, 0) != FC.balanced_subset(labels, 23, 1)  # by seed
    assert len(FC.balanced_subset(labels, 1000, 0)) == len(labels)


def test_stratified_split():
    names = [f"f{i}.mid" for i in range(43)]
    labels = ["x"] * 30 + ["y"] * 10 + ["z"] * 3
    s = TR.stratified_split(names, labels, 0.1, 0.1)
    per = {c: Counter(sp for sp, l in zip(s, labels) if l == c) for c in "xyz"}
    assert per["x"] == {"train": 24, "valid": 3, "test": 3} and per["y"] == {"train": 8, "valid": 1, "test": 1}
    assert per["z"] == {"train": 1, "valid": 1, "test": 1}
    # a file's split depends on its own name, not on the other rows
    s2 = TR.stratified_split(names[:30] + ["new.mid"] + names[30:], labels[:30] + ["x"] + labels[30:], 0.1, 0.1)
    assert sum(a != b for a, b in zip(s[:30], s2[:30])) <= 2


def test_metrics():
    m = FC.metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["accuracy"] == 0.6 and m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["macro_f1"] == round((0.5 + 0.8 + 0.0) / 3, 4)  # as sklearn f1_score(average="macro")


# -- bad input -----------------------------------------------------------------------------

def test_bad_labels_one_line_exit_1(toy, tmp_path):
    good = [(str(toy / r[0]), r[1], r[2]) for r in csv.reader(open(toy / "labels.csv"))][1:]
    cases = {
        "no column 'label'": write_csv(tmp_path / "cols.csv", [g[:2] for g in good], header=("path", "genre")),
        "unknown split 'dev'": write_csv(tmp_path / "split.csv", good[:-1] + [good[-1][:2] + ("dev",)]),
        "a single class": write_csv(tmp_path / "one.csv", [(g[0], "low", g[2]) for g in good]),
        "nowhere.mid: no such file": write_csv(tmp_path / "missing.csv", good + [("nowhere.mid", "low", "train")]),
        "no such labels file": tmp_path / "absent.csv",
    }
    for expect, path in cases.items():
        r = run("--labels", path, "--out", tmp_path / "o", *FAST, ok=False)
        assert r.returncode == 1 and expect in r.stderr, (expect, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # the same checks, in process
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FC.Fail, match="empty labels file"):
        FC.read_labels(tmp_path / "empty.csv")
    with pytest.raises(FC.Fail, match="no column 'split_midibert'"):
        FC.read_labels(cases["a single class"], split_col="split_midibert", split_required=True)
    with pytest.raises(FC.Fail, match="listed twice"):
        FC.read_labels(write_csv(tmp_path / "twice.csv", good + good[:1]))
    # every file unreadable: one line, exit 1
    (tmp_path / "bad1.mid").write_bytes(b"junk")
    (tmp_path / "bad2.mid").write_bytes(b"")
    rows = [(str(tmp_path / "bad1.mid"), "a", "train"), (str(tmp_path / "bad2.mid"), "b", "valid")]
    r = run("--labels", write_csv(tmp_path / "allbad.csv", rows), "--out", tmp_path / "o", *FAST, ok=False)
    assert r.returncode == 1 and "fewer than two classes" in r.stderr and "Traceback" not in r.stderr


def test_help_names_the_paper_options():
    # that every option shows its default: tests/test_pretrain.py::test_help_lists_every_option_with_its_default
    text = run("--help").stdout
    for opt in ("--labels", "--label_col", "--split_col", "--init", "--preset", "--slice_len", "--n_train",
                "--lr", "--warmup", "--resid_dropout", "--epochs", "--max_iters", "--resume", "--predict", "--ckpt"):
        assert f"  {opt} " in text, opt
    assert text.count("(default:") > 30


# -- real data -----------------------------------------------------------------------------

@pytest.mark.skipif(not (PIANIST8 / "labels_splits.csv").is_file(), reason="../shared/data/pianist8 not present")
def test_pianist8_few_files(tmp_path):
    # the real labels file's columns (path, pianist, split_midibert); a few files: 1 train per pianist
    rows = list(csv.DictReader(open(PIANIST8 / "labels_splits.csv")))
    pick, seen = [], Counter()
    for r in rows:
        quota = {"train": 1, "valid": 1, "test": 0}[r["split_midibert"]]
        if seen[r["pianist"], r["split_midibert"]] < quota and (r["split_midibert"] == "train" or len(pick) % 3 == 0):
            seen[r["pianist"], r["split_midibert"]] += 1
            pick.append((str(PIANIST8 / r["path"]), r["pianist"], r["split_midibert"]))
    csv_path = write_csv(tmp_path / "p8.csv", pick, header=("path", "pianist", "split_midibert"))
    out = tmp_path / "p8"
    run("--labels", csv_path, "--label_col", "pianist", "--split_col", "split_midibert", "--out", out,
        *FAST, "--slice_len", "256", "--max_iters", "3", "--batch_size", "4")
    res = json.loads((out / "results.json").read_text())
    assert res["classes"] == sorted({r["pianist"] for r in rows}) and len(res["classes"]) == 8
    assert res["files"]["train"] == 8 and res["files"]["valid"] >= 1 and res["selected_on"] == "valid"
    assert res["train_slices"] > 8 and len(res["epochs"]) == 1  # long files: many slices each


def test_init_from_a_pretrained_lm_reinit_eos_augment_and_split_fractions(toy, tmp_path):
    # lr 0: the finetuned trunk must still be the pretrained one, but for the <E> row (--reinit_eos)
    torch.manual_seed(0)
    lm = M.Aria(M.PRESETS["tiny"])
    M.save_checkpoint(tmp_path / "lm.pt", lm)
    base = ["--labels", toy / "nosplit.csv", *FAST, "--init", tmp_path / "lm.pt", "--max_iters", "1", "--lr", "0"]
    run(*base, "--out", tmp_path / "a")
    run(*base, "--out", tmp_path / "b", "--reinit_eos", "0", "--valid_frac", "0.25", "--test_frac", "0.25")
    run(*base, "--out", tmp_path / "c", "--augment")
    emb = {k: M.load_model(tmp_path / k).model.tok_embeddings.weight for k in "abc"}
    ref = lm.model.tok_embeddings.weight
    others = torch.arange(len(ref)) != T.EOS_ID
    assert torch.equal(emb["a"][others], ref[others]) and not torch.equal(emb["a"][T.EOS_ID], ref[T.EOS_ID])
    assert torch.equal(emb["b"], ref)
    assert torch.equal(M.load_model(tmp_path / "a").model.encode_layers[2].mixed_qkv.weight,
                       lm.model.encode_layers[2].mixed_qkv.weight)
    assert losses(tmp_path / "c")[1] != losses(tmp_path / "a")[1]  # augmented slices
    files = {k: json.loads((tmp_path / k / "results.json").read_text())["files"] for k in "ab"}
    assert files["a"] == {"train": 18, "valid": 3, "test": 3}  # 10% each, at least one per class
    assert files["b"] == {"train": 12, "valid": 6, "test": 6}  # 25% each
