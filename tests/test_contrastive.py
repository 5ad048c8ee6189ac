"""finetune_contrastive.py: NT-Xent (paper eq. 2) and the official loss against their definitions,
gathered negatives under 2 gloo processes, note-slice views, data order, and the CLI (loss falls,
checkpoint, exact resume, bad input)."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_contrastive as C  # noqa: E402
import model as M  # noqa: E402
import tokenizer as T  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "aria" / "golden" / "model"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# a fast run: the tiny official-format LM golden (d 64, 2 layers), short views
FAST = ["--emb_size", "32", "--max_len", "192", "--batch_size", "6", "--lr", "3e-3", "--log_interval", "1",
        "--workers", "0", "--device", "cpu", "--eval_interval", "0", "--eval_files", "4"]


def run(script, *args, ok=True, timeout=300):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=timeout, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out):
    return {d["step"]: d["loss"] for d in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in d}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr") / "ds"
    run("prepare.py", "--synthetic", "30", "--out", out, "--workers", "1", "--val_fraction", "0.2")
    return out


@pytest.fixture(scope="module")
def lm_tiny():
    if not (GOLDEN / "lm_tiny.safetensors").is_file():
        pytest.skip("../shared not present")
    return GOLDEN / "lm_tiny.safetensors"


# -- losses ------------------------------------------------------------------------------------

def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def eq2_loop(z1, z2, tau):
    """Paper eq. 2 written out: z_1..z_2N = z1 then z2; l(i,j) = -log exp(s_ij/t) / sum_{k!=i} exp(s_ik/t);
    L = 1/2 sum_k (l(k,k+N) + l(k+N,k)), divided by N (the mean over the 2N terms)."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    n = n2 // 2

    def l(i, j):
        den = sum(math.exp(cos(z[i], z[k]) / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(cos(z[i], z[j]) / tau) / den)

    return 0.5 * sum(l(k, k + n) + l(k + n, k) for k in range(n)) / n


def official_loop(z1, z2, tau):
    """The official loss by definition: S_ij = cos(z1_i, z2_j)/t; mean_i CE(row i, i) and mean_j CE(column j, j), averaged."""
    n = len(z1)
    S = [[cos(z1[i], z2[j]) / tau for j in range(n)] for i in range(n)]
    rows = -sum(S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(n))) for i in range(n)) / n
    cols = -sum(S[j][j] - math.log(sum(math.exp(S[i][j]) for i in range(n))) for j in range(n)) / n
    return (rows + cols) / 2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_is_eq2(tau):
    g = torch.Generator().manual_seed(0)
    for n, e in [(2, 3), (5, 8)]:
        z1, z2 = torch.randn(n, e, generator=g, dtype=torch.float64), torch.randn(n, e, generator=g, dtype=torch.float64)
        z2[0] = 3 * z1[0] + 0.1 * z2[0]  # a close pair; scale must not matter (cosine)
        assert C.nt_xent(z1, z2, tau).item() == pytest.approx(eq2_loop(z1, z2, tau), rel=1e-5)
        assert C.official_loss(z1, z2, tau).item() == pytest.approx(official_loop(z1, z2, tau), rel=1e-5)
    # symmetric in the views, and the two losses differ (2N-2 vs N-1 negatives)
    assert C.nt_xent(z2, z1, tau).item() == pytest.approx(C.nt_xent(z1, z2, tau).item(), rel=1e-6)
    assert abs(C.nt_xent(z1, z2, tau).item() - C.official_loss(z1, z2, tau).item()) > 1e-3
    # identical embeddings everywhere: every candidate is equally likely, loss = log(2N - 1)
    same = torch.ones(4, 3)
    assert C.nt_xent(same, same, tau).item() == pytest.approx(math.log(7), rel=1e-6)
    assert C.official_loss(same, same, tau).item() == pytest.approx(math.log(4), rel=1e-6)


def test_nt_xent_gradient_matches_loop():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    C.nt_xent(z1, z2, 0.1).backward()
    eps = 1e-6
    for z in (z1, z2):
        for idx in [(0, 0), (2, 3)]:
            with torch.no_grad():
                z[idx] += eps
                up = eq2_loop(z1, z2, 0.1)
                z[idx] -= 2 * eps
                down = eq2_loop(z1, z2, 0.1)
                z[idx] += eps
            assert z.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import finetune_contrastive as C
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)  # the global batch
    b = 8 // world
    out = {{}}
    for name in ("ntxent", "official"):
        a = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
        c = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = C.pair_loss(a, c, name, 0.1, distributed=True)
        loss.backward()
        out[name] = (loss.item(), a.grad, c.grad)
    torch.save(out, {out!r} + f"/rank{{rank}}.pt")
    dist.destroy_process_group()
""")


def test_gathered_negatives_under_ddp_equal_the_global_batch(tmp_path):
    script = tmp_path / "ddp_loss.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    for name in ("ntxent", "official"):
        a, c = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = C.pair_loss(a, c, name, 0.1, distributed=False)
        loss.backward()
        for rank in range(2):
            l, ga, gc = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert l == pytest.approx(loss.item(), rel=1e-6)  # every rank: the loss of the global batch
            # all_gather's backward sums the two ranks' (identical) losses' gradients; DDP then averages
            # the parameter gradients over the 2 ranks, which gives the global loss's gradient
            sl = slice(rank * 4, rank * 4 + 4)
            torch.testing.assert_close(ga / 2, a.grad[sl], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(gc / 2, c.grad[sl], rtol=1e-5, atol=1e-7)


# -- views and data order ----------------------------------------------------------------------

def test_views_are_rebased_note_slices(data):
    ds = C.ViewPairs(data, "train", 4, seed=0, augment=False)
    lengths = set()
    for g in range(12):
        ids = ds.file_ids(ds.file_of(g))
        file_notes = T.detokenize_notes(ids)[0]
        score, start, n = C.slice_score(ids, random.Random(g))
        expect_n = min(n, len(file_notes) - start)
        assert n == expect_n and (n >= 100 or start == 0) and n <= 650
        view = T.tokenize(score, dim=False)
        notes = T.detokenize_notes(view)[0]
        t0 = file_notes[start][0]
        assert notes == [(a - t0, b - t0, p, v, c) for a, b, p, v, c in file_notes[start:start + n]]
        lengths.add(n)
    assert len(lengths) > 3
    # the dataset item: two different views, no <D>, <E> at the recorded position, <P> after it
    for g in range(6):
        x, eos = ds[g]
        assert x.shape == (2, 2048) and eos.shape == (2,)
        for v in range(2):
            row = x[v].tolist()
            assert row[eos[v]] == T.EOS_ID and T.DIM_ID not in row and row.count(T.EOS_ID) == 1
            assert set(row[eos[v] + 1:]) <= {T.PAD_ID} and T.PAD_ID not in row[:eos[v]]
            assert row[0] == T.INSTRUMENT_PREFIX_ID["piano"] and row[1] == T.BOS_ID
        assert not torch.equal(x[0], x[1])


def test_max_len_and_augmentation(data):
    ds = C.ViewPairs(data, "train", 4, seed=0, max_len=100, augment=True)
    for g in range(8):
        x, eos = ds[g]
        assert x.shape == (2, 100) and (eos == 99).all() and (x[:, 99] == T.EOS_ID).all()
    plain = C.ViewPairs(data, "train", 4, seed=0, augment=False)
    aug = C.ViewPairs(data, "train", 4, seed=0, augment=True)
    assert any(not torch.equal(plain[g][0], aug[g][0]) for g in range(4))
    assert torch.equal(aug[3][0], C.ViewPairs(data, "train", 4, seed=0, augment=True)[3][0])  # a function of (seed, g)
    assert not torch.equal(aug[3][0], C.ViewPairs(data, "train", 4, seed=1, augment=True)[3][0])


def test_every_file_once_per_epoch_and_never_twice_in_a_batch(data):
    per_step = 5
    ds = C.ViewPairs(data, "train", per_step, seed=3)
    n = ds.n
    assert len(ds) == math.ceil(n / per_step) * per_step
    for epoch in range(2):
        files = [ds.file_of(epoch * len(ds) + i) for i in range(len(ds))]
        assert set(files[:n]) == set(range(n)) and len(set(files[:n])) == n
        for s in range(0, len(ds), per_step):
            assert len(set(files[s:s + per_step])) == per_step
    assert [ds.file_of(g) for g in range(n)] != [ds.file_of(len(ds) + g) for g in range(n)]  # reshuffled


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_loss_falls_and_checkpoint_is_an_embedding_model(data, lm_tiny, tmp_path):
    out = tmp_path / "emb"
    run("finetune_contrastive.py", "--init", lm_tiny, "--data", data, "--out", out, "--max_iters", "30",
        "--no_augment", *FAST)
    loss = losses(out)
    chance = math.log(2 * 6 - 1)
    assert np.mean([loss[s] for s in (1, 2, 3)]) == pytest.approx(chance, abs=0.1)
    assert np.mean([loss[s] for s in (28, 29, 30)]) < chance - 1.0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert "val_loss" in log[-1] and 0 <= log[-1]["val_top1"] <= 1
    m = M.load_model(out)
    assert m.heads == ("emb",) and m.config.emb_size == 32
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["args"]["loss"] == "ntxent" and ckpt["args"]["temperature"] == 0.1
    import embed as E
    e = E.embed_files(m, [str(p) for p in sorted((data / "midi").glob("*.mid"))[:2]], max_len=192)[0]
    assert e.shape == (2, 32) and np.isfinite(e).all()


def test_cli_resume_and_two_processes_are_exact(data, lm_tiny, tmp_path):
    common = ["--init", lm_tiny, "--data", data, "--max_iters", "6", *FAST]
    run("finetune_contrastive.py", *common, "--out", tmp_path / "a")
    run("finetune_contrastive.py", *common, "--out", tmp_path / "b", "--stop_at", "3")
    assert max(losses(tmp_path / "b")) == 3
    r = run("finetune_contrastive.py", "--out", tmp_path / "b", "--resume", "--workers", "0", "--device", "cpu")
    assert "resuming" in r.stdout
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # two gloo processes of 3 pairs each see the global batch of 6 (negatives gathered across them)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(ROOT / "finetune_contrastive.py"), *map(str, common), "--batch_size", "3",
                        "--stop_at", "3", "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, env=ENV, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = losses(tmp_path / "a"), losses(tmp_path / "c")
    assert sorted(two) == [1, 2, 3]
    for s in two:
        assert two[s] == pytest.approx(one[s], abs=2e-5)


def test_cli_random_init_official_loss(data, tmp_path):
    out = tmp_path / "scratch"
    run("finetune_contrastive.py", "--init", "none", "--preset", "tiny", "--data", data, "--out", out,
        "--max_iters", "2", "--loss", "official", "--temperature", "0.5", *FAST)
    m = M.load_model(out)
    assert m.heads == ("emb",) and m.config.d_model == M.PRESETS["tiny"].d_model
    assert losses(out)[1] == pytest.approx(math.log(6), abs=0.2)  # chance of the B x B loss


def fails(monkeypatch, *args):
    """Run finetune_contrastive.main in this process -> its one-line error (exit status 1)."""
    monkeypatch.setattr(sys, "argv", ["finetune_contrastive.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        C.main()
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # sys.exit(str): status 1, one line
    return e.value.code


def test_cli_help_and_bad_inputs(data, tmp_path, monkeypatch):
    h = " ".join(run("finetune_contrastive.py", "--help").stdout.split())
    for opt in ("--init", "--data", "--emb_size", "--temperature", "--loss", "--no_augment", "--max_len", "--resume",
                "--seed", "--batch_size", "--workers", "--device", "--max_iters", "(default: 512)", "(default: 0.1)"):
        assert opt in h, opt
    r = run("finetune_contrastive.py", "--init", tmp_path / "missing.pt", "--data", data, "--out", tmp_path / "o", ok=False)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert "not a dataset" in fails(monkeypatch, "--init", "none", "--data", tmp_path, "--out", tmp_path / "o")
    assert "lower --batch_size" in fails(monkeypatch, "--init", "none", "--data", data, "--out", tmp_path / "o",
                                         "--batch_size", "500", "--device", "cpu")
    assert "nothing to resume" in fails(monkeypatch, "--out", tmp_path / "nothing", "--resume")
    assert "--min_notes" in fails(monkeypatch, "--init", "none", "--data", data, "--min_notes", "700")
    notlm = tmp_path / "junk.pt"
    notlm.write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in fails(monkeypatch, "--init", notlm, "--data", data, "--out", tmp_path / "o", "--device", "cpu")
    monkeypatch.setattr(sys, "argv", ["finetune_contrastive.py", "--data", str(data)])
    with pytest.raises(SystemExit) as e:
        C.main()
    assert e.value.code == 2  # argparse: --init is required


def test_cli_temperature_changes_the_loss(data, tmp_path):
    first = {}
    for t in ("0.1", "0.5"):
        out = tmp_path / t
        run("finetune_contrastive.py", "--init", "none", "--preset", "tiny", "--data", data, "--out", out,
            "--max_iters", "1", "--temperature", t, "--no_augment", *FAST)
        first[t] = losses(out)[1]
    assert abs(first["0.1"] - first["0.5"]) > 1e-3, first  # same views, same model: only t differs
