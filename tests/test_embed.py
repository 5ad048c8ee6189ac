"""embed.py: official global embeddings (golden), --nearest, the linear probe (on Pianist8 when
present), --map without matplotlib, bad inputs; the chunking and probe options by their effects
(on MIDI and a tiny model made here), bfloat16 autocast against float32."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import embed as E  # noqa: E402
import model as M  # noqa: E402
import tokenizer as T  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "aria" / "golden" / "model"
MIDI = SHARED / "aria" / "midi"
PIANIST8 = SHARED / "data" / "pianist8"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, ok=True):
    # --device cpu on every run: the suite gives the same result, in the same time, on a GPU machine
    r = subprocess.run([sys.executable, str(ROOT / "embed.py"), *map(str, args), "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def inproc(capsys, *args):
    """embed.main in this process, on the CPU -> (exit status, stdout, stderr)."""
    try:
        rc = E.main([str(a) for a in args] + ["--device", "cpu"])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    if not (GOLDEN / "emb_tiny.safetensors").is_file():
        pytest.skip("../shared not present")
    return GOLDEN


def test_function_equals_official_global_embeddings(golden):
    io = np.load(golden / "emb_tiny_io.npz")
    m = E.load_embedder(golden / "emb_tiny.safetensors")
    for name in ("waltz", "nocturne"):
        e = E.global_embedding(m, str(MIDI / f"{name}.mid"))
        np.testing.assert_allclose(e, io[f"global_emb_{name}"], atol=1e-5, rtol=0)
    # batched with other files and padded: the same vectors, in input order
    files = [str(MIDI / f) for f in ("pop.mid", "waltz.mid", "basic.mid", "nocturne.mid")]
    emb, ok, errors = E.embed_files(m, files, batch_size=3)
    assert ok == files and not errors and emb.shape == (4, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[1], io["global_emb_waltz"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb[3], io["global_emb_nocturne"], atol=1e-5, rtol=0)


def test_cli_equals_official_global_embeddings_and_skips_bad_files(golden, tmp_path):
    io = np.load(golden / "emb_tiny_io.npz")
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd junk")
    out = tmp_path / "x.npy"
    r = cli("--ckpt", golden / "emb_tiny.safetensors", MIDI / "waltz.mid", bad, MIDI / "nocturne.mid", "--out", out,
            "--batch_size", "2")
    assert "skipping" in r.stderr and "bad.mid" in r.stderr
    emb = np.load(out)
    assert (tmp_path / "x.files.txt").read_text().splitlines() == [str(MIDI / "waltz.mid"), str(MIDI / "nocturne.mid")]
    np.testing.assert_allclose(emb[0], io["global_emb_waltz"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb[1], io["global_emb_nocturne"], atol=1e-5, rtol=0)


def test_nearest_and_saved_embeddings(golden, tmp_path, capsys):
    r = cli("--ckpt", golden / "emb_tiny.safetensors", MIDI, "--nearest", "3", MIDI / "waltz.mid",
            "--out", tmp_path / "all.npy")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# nearest to") and len(lines) == 4
    sims = []
    for rank, line in enumerate(lines[1:], start=1):
        k, sim, path = line.split("\t")
        assert int(k) == rank and Path(path).is_file() and not path.endswith("waltz.mid")  # the query is left out
        sims.append(float(sim))
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    # the same from the saved embeddings, without a model
    rc, out, _ = inproc(capsys, "--emb", tmp_path / "all.npy", MIDI, "--nearest", "3", MIDI / "waltz.mid")
    assert rc == 0 and out == r.stdout
    emb = np.load(tmp_path / "all.npy")
    names = (tmp_path / "all.files.txt").read_text().splitlines()
    q = emb[names.index(str(MIDI / "waltz.mid"))]
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    best = [names[i] for i in np.argsort(-(e @ (q / np.linalg.norm(q))))[1:4]]
    assert [line.split("\t")[2] for line in lines[1:]] == best


def test_hidden_head_and_lm_only_checkpoint(golden, tmp_path, capsys):
    rc, _, err = inproc(capsys, "--ckpt", golden / "lm_tiny.safetensors", MIDI / "waltz.mid", "--out", tmp_path / "x.npy")
    assert rc == 1 and "no embedding head" in err and "--head hidden" in err and len(err.strip().splitlines()) == 1
    rc, _, _ = inproc(capsys, "--ckpt", golden / "lm_tiny.safetensors", MIDI / "waltz.mid", "--out", tmp_path / "x.npy",
                      "--head", "hidden")
    assert rc == 0
    h = np.load(tmp_path / "x.npy")
    m = M.load_model(golden / "lm_tiny.safetensors")
    chunks = T.note_chunks(str(MIDI / "waltz.mid"), 300)
    with torch.no_grad():
        ref = torch.stack([m.hidden(torch.tensor([c]))[0, -1] for c in chunks]).mean(0)
    np.testing.assert_allclose(h[0], ref.numpy(), atol=1e-5)


def test_bad_inputs(golden, tmp_path, capsys):
    ck = golden / "emb_tiny.safetensors"
    r = cli("--ckpt", tmp_path / "none.pt", MIDI / "waltz.mid", "--out", tmp_path / "x.npy", ok=False)
    assert r.returncode == 1 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cases = [
        (["--ckpt", ck, tmp_path / "missing.mid", "--out", tmp_path / "x.npy"], "no such file"),
        (["--ckpt", ck, MIDI / "waltz.mid", "--nearest", "x", MIDI / "waltz.mid"], "K must be a number"),
        (["--ckpt", ck, MIDI / "waltz.mid", "--nearest", "2", tmp_path / "q.mid"], "no such file"),
        (["--ckpt", ck, MIDI / "waltz.mid", "--probe", tmp_path / "labels.csv"], "no such labels file"),
        (["--emb", tmp_path / "x.npy", MIDI / "waltz.mid", "--nearest", "1", MIDI / "waltz.mid"], "no such file"),
        (["--ckpt", ck, MIDI / "waltz.mid", "--out", tmp_path / "x.npy", "--notes_per_chunk", "0"], "--notes_per_chunk"),
        (["--ckpt", ck, MIDI / "waltz.mid", "--out", tmp_path / "x.npy", "--max_len", "1"], "--max_len"),
        (["--ckpt", ck, "--probe", tmp_path / "l.csv", "--probe_epochs", "10,x"], "--probe_epochs"),
        (["--ckpt", ck, "--probe", tmp_path / "l.csv", "--probe_epochs", "0"], "--probe_epochs"),
    ]
    for args, msg in cases:
        rc, _, err = inproc(capsys, *args)
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    junk = tmp_path / "junk.mid"
    junk.write_bytes(b"")
    rc, _, err = inproc(capsys, "--ckpt", ck, junk, "--out", tmp_path / "x.npy")
    assert rc == 1 and "none of the files could be embedded" in err
    rc, _, err = inproc(capsys, "--ckpt", ck, MIDI / "waltz.mid")
    assert rc == 2 and "nothing to do" in err
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\nx.mid,a\n")
    rc, _, err = inproc(capsys, "--ckpt", ck, "--probe", labels, "--split_col", "fold")
    assert rc == 1 and "no column 'fold'" in err  # a split column asked for by name must be there


def test_probe_without_a_split_column_splits_as_finetune_cls(tmp_path, capsys):
    import finetune_cls as FC
    g = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 10)
    x = ((g.normal(size=(3, 8)) * 2)[y] + g.normal(size=(30, 8))).astype(np.float32)
    paths = [tmp_path / f"f{i}.mid" for i in range(30)]
    for p in paths:
        p.write_bytes(b"")  # only the names matter with --emb
    E.save_embeddings(tmp_path / "e.npy", x, [str(p) for p in paths])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p.name},c{c}\n" for p, c in zip(paths, y)))
    rc, _, err = inproc(capsys, "--emb", tmp_path / "e.npy", "--probe", labels, "--probe_epochs", "2",
                        "--probe_out", tmp_path / "r.json")
    assert rc == 0 and "stratified split" in err, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["split"] == "stratified" and res["files"] == {"train": 24, "valid": 3, "test": 3}
    rows, split = E.read_labels(labels)
    cls_rows, _, has_split = FC.read_labels(labels)
    assert split == "stratified" and not has_split
    assert [r[2] for r in rows] == [r[2] for r in cls_rows]  # the same files in the same splits


def test_probe_learns_separable_embeddings_and_metrics():
    g = np.random.default_rng(0)
    centers = g.normal(size=(3, 16)) * 3
    y = np.repeat(np.arange(3), 40)
    x = centers[y] + g.normal(size=(120, 16))
    splits = np.where(np.arange(120) % 4 == 0, "test", "train")
    res = E.linear_probe(x, [f"c{i}" for i in y], splits, epochs=(10, 20, 50), lr=1e-2, batch_size=8)
    assert [r["epochs"] for r in res["runs"]] == [10, 20, 50]
    assert res["best"]["test"]["accuracy"] == 1.0 and res["files"] == {"train": 90, "valid": 0, "test": 30}
    again = E.linear_probe(x, [f"c{i}" for i in y], splits, epochs=(10, 20, 50), lr=1e-2, batch_size=8)
    assert again == res  # seeded
    m = E.metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 4)
    # F1: class 0 2*1/(2+3)... per class: c0 tp1 pred2 true2 -> 0.5; c1 tp2 pred3 true2 -> 0.8; c2 0; c3 absent
    assert m["accuracy"] == pytest.approx(0.6) and m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    xy = E.pca_2d(x)
    assert xy.shape == (120, 2) and abs(np.cov(xy.T)[0, 1]) < 1e-6


def test_probe_on_pianist8_subset_and_map(golden, tmp_path, capsys):
    if not (PIANIST8 / "labels_splits.csv").is_file():
        pytest.skip("../shared/data/pianist8 not present")
    rows = list(csv.DictReader(open(PIANIST8 / "labels_splits.csv")))
    pick = {}
    for r in rows:  # 4 pianists, 3 train + 1 test file each
        key = (r["pianist"], r["split_midibert"])
        if r["pianist"] in ("bethel", "clayderman", "einaudi", "hancock") and r["split_midibert"] in ("train", "test"):
            if len(pick.setdefault(key, [])) < (3 if key[1] == "train" else 1):
                pick[key].append(r)
    subset = tmp_path / "p8.csv"
    with open(subset, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "pianist", "split_midibert"])
        for rs in pick.values():
            for r in rs:
                w.writerow([str(PIANIST8 / r["path"]), r["pianist"], r["split_midibert"]])
    r = cli("--ckpt", golden / "emb_tiny.safetensors", "--probe", subset, "--label_col", "pianist",
            "--split_col", "split_midibert", "--max_chunks", "1", "--out", tmp_path / "p8.npy",
            "--probe_out", tmp_path / "res.json", "--map", tmp_path / "map.png")
    assert "probe: 4 classes, files train 12 / valid 0 / test 4" in r.stdout
    for n in (10, 20, 50):
        assert any(line.split()[:1] == [str(n)] for line in r.stdout.splitlines())
    assert "best (test accuracy" in r.stdout and "macro-F1" in r.stdout
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["best"]["test"]["accuracy"] == max(x["test"]["accuracy"] for x in res["runs"])
    assert np.load(tmp_path / "p8.npy").shape == (16, 32)
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "map.png").is_file()
    except ImportError:
        assert "matplotlib" in r.stderr and "not installed" in r.stderr and not (tmp_path / "map.png").exists()
    # the same probe from the saved embeddings, no model
    rc, out, _ = inproc(capsys, "--emb", tmp_path / "p8.npy", "--probe", subset, "--label_col", "pianist",
                        "--split_col", "split_midibert")
    assert rc == 0 and out == r.stdout


def test_help_lists_options_with_defaults():
    h = " ".join(cli("--help").stdout.split())
    for opt in ("--ckpt", "--out", "--nearest", "--probe", "--label_col", "--split_col", "--map", "--device",
                "--batch_size", "--head", "--dtype", "(default: auto)", "(default: 300)", "(default: 0.0003)", "(default: 10,20,50)"):
        assert opt in h, opt


# -----------------------------------------------------------------------------
# options by their effects, on MIDI and a tiny model made here (no ../shared needed)


def write_midi(path, n_notes, low=48, seed=0):
    """n_notes notes of varied pitch (low..low+24), velocity and timing -> a MIDI file."""
    g = np.random.default_rng(seed)
    t, notes = 0, []
    for _ in range(n_notes):
        t += int(g.integers(60, 400))
        notes.append((t, t + int(g.integers(80, 900)), low + int(g.integers(0, 25)), int(g.integers(30, 110)), 0))
    T.notes_to_midi(notes, {0: 0}).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a random 2-layer model with a 16-d embedding head, its checkpoint)."""
    torch.manual_seed(0)
    m = M.Aria(M.ModelConfig(d_model=64, n_heads=1, n_layers=2, max_seq_len=256, emb_size=16), heads=("emb",)).eval()
    path = tmp_path_factory.mktemp("tiny") / "emb.pt"
    M.save_checkpoint(path, m)
    return m, path


def by_hand(model, path, notes_per_chunk, max_len=256, max_chunks=0):
    """The official recipe written out (aria/embedding.py @ b0486c8, get_global_embedding_from_midi):
    consecutive note slices, each tokenized without <D>, cut to max_len with the last token forced to
    <E>, one at a time; the mean of the head at <E>."""
    score = T.load_midi(str(path))
    starts = range(0, len(score.notes), notes_per_chunk)
    zs = []
    for i in list(starts)[:max_chunks or None]:
        ids = T.tokenize(score.with_notes(score.notes[i:i + notes_per_chunk]), dim=False)
        ids = ids[:max_len - 1] + [T.EOS_ID] if len(ids) > max_len else ids
        assert ids[-1] == T.EOS_ID
        with torch.no_grad():
            zs.append(model(torch.tensor([ids]), out_pos=torch.tensor([len(ids) - 1]), head="emb")[0])
    return torch.stack(zs).mean(0).numpy()


def test_chunk_options_change_the_embedding_as_specified(tiny, tmp_path, capsys):
    model, ck = tiny
    song = write_midi(tmp_path / "song.mid", 45)
    n_tokens = len(T.tokenize(str(song), dim=False))
    assert 60 < n_tokens <= 256  # one chunk by default, and --max_len 60 cuts it

    def emb(*opts):
        rc, _, err = inproc(capsys, "--ckpt", ck, song, "--out", tmp_path / "x.npy", *opts)
        assert rc == 0, err
        return np.load(tmp_path / "x.npy")[0]

    runs = {"default": (emb(), by_hand(model, song, 300)),
            "--notes_per_chunk 10": (emb("--notes_per_chunk", 10), by_hand(model, song, 10)),
            "--max_chunks 2": (emb("--notes_per_chunk", 10, "--max_chunks", 2), by_hand(model, song, 10, max_chunks=2)),
            "--max_len 60": (emb("--max_len", 60), by_hand(model, song, 300, max_len=60))}
    for name, (got, want) in runs.items():
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)
    # and each is a different vector: an ignored option would give the default (or the 10-note) one
    vecs = [v for v, _ in runs.values()]
    for i in range(len(vecs)):
        for j in range(i):
            assert np.abs(vecs[i] - vecs[j]).max() > 1e-3, (list(runs)[i], list(runs)[j])


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bfloat16_autocast_is_close_to_float32(tiny, golden_or_none, tmp_path, capsys):
    """--dtype bfloat16 on the CPU is what CUDA runs by default: close to float32, not equal to it."""
    models = [tiny[1]] + ([golden_or_none / "emb_tiny.safetensors"] if golden_or_none else [])
    files = [write_midi(tmp_path / f"{i}.mid", 40 + 20 * i, seed=i) for i in range(3)]
    if golden_or_none:
        files += [MIDI / "waltz.mid", MIDI / "nocturne.mid"]
    for ck in models:
        out = {}
        for dtype in ("float32", "bfloat16"):
            rc, _, err = inproc(capsys, "--ckpt", ck, *files, "--out", tmp_path / f"{dtype}.npy", "--dtype", dtype)
            assert rc == 0 and (dtype == "float32") != ("bfloat16 autocast" in err), err
            out[dtype] = np.load(tmp_path / f"{dtype}.npy")
            assert out[dtype].dtype == np.float32
        assert cosines(out["float32"], out["bfloat16"]).min() > 0.99, ck
        assert np.abs(out["float32"] - out["bfloat16"]).max() > 1e-4, ck  # autocast really ran


@pytest.fixture(scope="module")
def golden_or_none():
    return GOLDEN if (GOLDEN / "emb_tiny.safetensors").is_file() else None


def test_probe_nearest_and_pca_stay_float32_inside_autocast():
    """A caller's bfloat16 autocast (a training script's evaluation) must not reach the probe's
    matmuls, the cosines or the PCA: the results are bit-identical with and without it."""
    g = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    x = (g.normal(size=(3, 24)) * 2)[y] + g.normal(size=(60, 24))
    splits = np.where(np.arange(60) % 5 == 0, "test", "train")
    plain = (E.train_probe(x, y, 3, 5, lr=1e-2), E.linear_probe(x, y, splits, (3, 5), lr=1e-2),
             E.cosine_nearest(x, x[0], 5), E.pca_2d(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (E.train_probe(x, y, 3, 5, lr=1e-2), E.linear_probe(x, y, splits, (3, 5), lr=1e-2),
                  E.cosine_nearest(x, x[0], 5), E.pca_2d(x))
    assert plain[0].weight.dtype == torch.float32
    assert torch.equal(plain[0].weight, inside[0].weight) and torch.equal(plain[0].bias, inside[0].bias)
    assert plain[1] == inside[1] and plain[2] == inside[2] and np.array_equal(plain[3], inside[3])


def test_cli_bfloat16_run_probes_and_ranks_in_float32(tiny, tmp_path, capsys):
    """With --dtype bfloat16 only the model is in bfloat16: the probe and --nearest in that run
    equal those computed afterwards from its saved float32 embeddings (--emb, no model, no autocast)."""
    _, ck = tiny
    rows = []
    for i in range(12):  # two classes by register; 4 train + 2 test each
        cls = i % 2
        rows.append((write_midi(tmp_path / f"f{i}.mid", 30, low=36 + 36 * cls, seed=i), f"c{cls}",
                     "test" if i >= 8 else "train"))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(f"{p.name},{c},{s}\n" for p, c, s in rows))
    common = ["--nearest", 3, rows[0][0], "--probe", labels, "--probe_epochs", "3,6", "--probe_lr", "1e-2"]
    rc, out_model, err = inproc(capsys, "--ckpt", ck, "--dtype", "bfloat16", "--out", tmp_path / "e.npy",
                                "--probe_out", tmp_path / "a.json", *common)
    assert rc == 0 and "bfloat16 autocast" in err, err
    rc, out_saved, err = inproc(capsys, "--emb", tmp_path / "e.npy", "--probe_out", tmp_path / "b.json", *common)
    assert rc == 0, err
    assert out_model == out_saved and "# nearest to" in out_model and "probe: 2 classes" in out_model
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_probe_options_from_the_cli(tmp_path, capsys):
    """Each probe option changes the result the way it should (saved embeddings, so no model)."""
    g = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 25)
    x = ((g.normal(size=(3, 12)) * 1.5)[y] + g.normal(size=(75, 12))).astype(np.float32)
    paths = [tmp_path / f"f{i}.mid" for i in range(75)]
    for p in paths:
        p.write_bytes(b"")  # only the names matter with --emb
    E.save_embeddings(tmp_path / "e.npy", x, [str(p) for p in paths])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(f"{p.name},c{c},{'test' if i % 5 == 0 else 'train'}\n"
                                                      for i, (p, c) in enumerate(zip(paths, y))))
    base = {"--probe_epochs": "4", "--probe_lr": "1e-2", "--probe_batch_size": "8", "--probe_weight_decay": "0",
            "--seed": "0"}

    def probe(**change):
        opts = {**base, **{f"--{k}": str(v) for k, v in change.items()}}
        out = tmp_path / "r.json"
        rc, stdout, err = inproc(capsys, "--emb", tmp_path / "e.npy", "--probe", labels, "--probe_out", out,
                                 *[a for kv in opts.items() for a in kv])
        assert rc == 0, err
        res = json.loads(out.read_text())
        out.unlink()
        assert f"{res['runs'][-1]['train_loss']:.4f}" in stdout  # the file holds what was printed
        return res

    ref = probe()
    loss = ref["runs"][0]["train_loss"]
    assert [r["epochs"] for r in ref["runs"]] == [4] and ref["files"] == {"train": 60, "valid": 0, "test": 15}
    assert ref["best"]["test"]["accuracy"] > 0.8 and loss < 0.5  # it learnt
    assert probe() == ref  # deterministic
    several = probe(probe_epochs="1,4,12")
    assert [r["epochs"] for r in several["runs"]] == [1, 4, 12]
    assert several["runs"][1] == ref["runs"][0]  # each epoch count is its own run from the same start
    l1, _, l12 = (r["train_loss"] for r in several["runs"])
    assert l1 > loss > l12
    assert probe(probe_lr=1e-4)["runs"][0]["train_loss"] > loss + 0.3  # smaller steps, less learnt
    assert probe(probe_batch_size=60)["runs"][0]["train_loss"] > loss + 0.3  # 4 steps instead of 32
    assert probe(probe_weight_decay=30)["runs"][0]["train_loss"] > loss + 0.3  # weights held near 0
    assert probe(seed=1)["runs"][0]["train_loss"] != loss  # another init and order
