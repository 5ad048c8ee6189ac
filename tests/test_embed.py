"""embed.py: official global embeddings (golden), --nearest, the linear probe (on Pianist8 when
present), --map without matplotlib, bad inputs."""
import csv
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

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "aria" / "golden" / "model"
MIDI = SHARED / "aria" / "midi"
PIANIST8 = SHARED / "data" / "pianist8"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "embed.py"), *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=300, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def inproc(capsys, *args):
    """embed.main in this process -> (exit status, stdout, stderr)."""
    try:
        rc = E.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


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
    import tokenizer as T
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
    rc, _, err = inproc(capsys, "--ckpt", ck, "--probe", labels)
    assert rc == 1 and "no column 'split'" in err


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
    import json
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
                "--batch_size", "--head", "(default: 300)", "(default: 0.0003)", "(default: 10,20,50)"):
        assert opt in h, opt
