"""Tests for model.py: golden compatibility with the official Aria code, KV cache,
checkpoint I/O and training-path details. CPU only, a few seconds."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import training as TR  # noqa: E402

SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "aria" / "golden" / "model"
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def golden(name):
    if not GOLDEN.is_dir():
        pytest.skip("../shared (golden model files) not available")
    io = np.load(GOLDEN / f"{name}_io.npz")
    return GOLDEN / f"{name}.safetensors", {k: torch.from_numpy(io[k]) for k in io.files}


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs error {err}"


def tiny_cfg(**kw):
    return M.ModelConfig(**{**dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=97), **kw})


def random_model(heads=("lm",), seed=0, **kw):
    torch.manual_seed(seed)
    return M.Aria(tiny_cfg(**kw), heads).eval()


# -----------------------------------------------------------------------------
# golden checkpoints from the official code


@torch.no_grad()
def test_golden_lm():
    path, io = golden("lm_tiny")
    m = M.load_model(path)
    assert m.heads == ("lm",) and not m.training
    close(m(io["input_ids"]), io["logits"])
    close(m.hidden(io["input_ids"]), io["hidden"])


@pytest.mark.parametrize("name,all_key,eos_key", [("emb_tiny", "emb_all", "emb_at_eos"),
                                                   ("cl_tiny", "logits_all", "logits_at_eos")])
@torch.no_grad()
def test_golden_emb_and_cls(name, all_key, eos_key):
    path, io = golden(name)
    m = M.load_model(path)
    assert m.heads == (("emb",) if name == "emb_tiny" else ("cls",))
    close(m(io["input_ids"]), io[all_key])
    close(m(io["input_ids"], out_pos=io["eos_pos"]), io[eos_key])
    if name == "emb_tiny":  # causal: padding after <E> changes nothing
        n = io["eos_pos"][0].item() + 1
        close(m(io["input_ids"][:1, :n])[0, -1], io["emb_row0_unpadded_last"])


@torch.no_grad()
def test_golden_lm_cnd():
    path, io = golden("lm_cnd_tiny")
    m = M.load_model(path)
    assert m.heads == ("lm", "adapter") and m.config.emb_size == 32
    close(m(io["input_ids"], emb=io["cond_emb"]), io["logits_with_emb"])
    close(m(io["input_ids"]), io["logits_without_emb"])


@torch.no_grad()
def test_golden_inferred_config(tmp_path):
    # no JSON beside the weights: architecture from tensor shapes. The head count
    # cannot be read from weights (64-wide heads are assumed, the golden tiny
    # models use 16-wide ones), so it is passed explicitly.
    path, io = golden("lm_cnd_tiny")
    shutil.copy(path, tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="64-wide heads"):
        guessed = M.load_model(tmp_path / "w.safetensors")
    ref = json.loads((GOLDEN / "lm_cnd_tiny.json").read_text())
    for k in ("d_model", "n_layers", "ff_mult", "vocab_size", "emb_size"):
        assert getattr(guessed.config, k) == ref[k], k
    assert guessed.config.n_heads == 1 and guessed.heads == ("lm", "adapter")
    m = M.load_model(tmp_path / "w.safetensors", n_heads=4)
    close(m(io["input_ids"], emb=io["cond_emb"]), io["logits_with_emb"])
    shutil.copy(GOLDEN / "cl_tiny.safetensors", tmp_path / "model.safetensors")
    c = M.load_model(tmp_path, n_heads=4)  # folder -> model.safetensors; n_heads given: no warning
    assert c.heads == ("cls",) and c.config.class_size == 4


def test_medium_state_dict_matches_official():
    if not GOLDEN.is_dir():
        pytest.skip("../shared not available")
    ref = json.loads((GOLDEN / "medium_state_dict_shapes.json").read_text())
    med = M.PRESETS["medium"]
    builds = {"TransformerLM": (med, ("lm",)),
              "TransformerEMB": (M.ModelConfig(**{**vars(med), "emb_size": 512}), ("emb",)),
              "TransformerCL": (M.ModelConfig(**{**vars(med), "class_size": 2}), ("cls",)),
              "TransformerLM_CND": (M.ModelConfig(**{**vars(med), "emb_size": 512}), ("lm", "adapter")),
              "model_cuda.TransformerLM": (M.ModelConfig(**{**vars(med), "emb_size": 512}), ("lm", "adapter"))}
    assert len(ref) == len(builds)
    for name, entry in ref.items():
        cfg, heads = builds[name.split(" ")[0]]
        with torch.device("meta"):
            m = M.Aria(cfg, heads)
        got = {k: list(v.shape) for k, v in m.state_dict().items()}
        assert got == entry["keys"], name
        assert m.num_params() == entry["num_params"], name
    with torch.device("meta"):
        assert M.Aria(med).num_params() == 658_538_496


# -----------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def test_kv_cache_right_padded_batch():
    m = random_model()
    lens, n_new, pad = [5, 9, 3], 6, 2
    torch.manual_seed(1)
    seqs = torch.randint(3, 97, (3, max(lens) + n_new))
    full = m(seqs)  # (3, T, V): reference, one row per sequence (causal, so rows are independent)
    prompt = torch.full((3, max(lens)), pad)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b, :n]
    m.setup_cache(3, 32)
    out = m(prompt, input_pos=torch.arange(max(lens)))  # prefill, shared positions
    for b, n in enumerate(lens):
        close(out[b, :n], full[b, :n])
    last = m(prompt, input_pos=torch.arange(max(lens)).expand(3, -1), out_pos=torch.tensor(lens) - 1)
    close(last, full[torch.arange(3), torch.tensor(lens) - 1])  # re-prefill with (B, T) positions
    pos = torch.tensor(lens)
    for step in range(n_new):  # decode: each row at its own position; pad slots get overwritten
        tok = seqs[torch.arange(3), pos][:, None]  # (B, 1)
        out = m(tok, input_pos=pos[:, None])
        close(out[:, 0], full[torch.arange(3), pos])
        pos = pos + 1
    for layer in m.model.encode_layers:
        layer.kv_cache = None
    with pytest.raises(RuntimeError, match="setup_cache"):
        m(tok, input_pos=pos[:, None])


@torch.no_grad()
def test_kv_cache_golden_lm():
    path, io = golden("lm_tiny")
    m = M.load_model(path)
    ids = io["input_ids"]
    m.setup_cache(2, 40)
    outs = [m(ids[:, :20], input_pos=torch.arange(20))]
    for t in range(20, 40):
        outs.append(m(ids[:, t:t + 1], input_pos=torch.tensor([t])))
    close(torch.cat(outs, 1), io["logits"])


def test_compile_fullgraph_no_graph_breaks():
    # backend="eager" checks tracing (no graph breaks, no .item()) without a C++ toolchain
    torch._dynamo.reset()
    m = random_model(grad_checkpoint=True).train()
    ids = torch.randint(0, 97, (2, 16))
    fwd = torch.compile(m, backend="eager", fullgraph=True)
    close(fwd(ids), m(ids))
    m.eval()
    m.setup_cache(2, 32)
    with torch.no_grad():
        m(ids, input_pos=torch.arange(16))
        ref = m(ids[:, -1:], input_pos=torch.tensor([[16], [16]]))
        m(ids, input_pos=torch.arange(16))
        step = torch.compile(m, backend="eager", fullgraph=True)
        close(step(ids[:, -1:], input_pos=torch.tensor([[16], [16]])), ref)
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# checkpoints


def test_save_load_roundtrip_and_extra_state(tmp_path):
    m = random_model(heads=("lm", "adapter"), emb_size=8)
    opt = TR.configure_optimizer(m, lr=1e-3)
    ids = torch.randint(0, 97, (2, 12))
    m.train()
    m(ids).float().mean().backward()
    opt.step()
    m.eval()
    M.save_checkpoint(tmp_path / "run" / "ckpt.pt", torch.compile(m, backend="eager"), step=7,
                      optimizer=opt.state_dict(), rng=torch.get_rng_state(), args={"lr": 1e-3})
    assert not list((tmp_path / "run").glob("*.tmp"))
    ck = M.load_checkpoint(tmp_path / "run")
    assert set(ck) >= {"model", "config", "heads", "vocab_hash", "step", "optimizer", "rng", "args"}
    assert not any("_orig_mod" in k for k in ck["model"]) and ck["step"] == 7
    opt.load_state_dict(ck["optimizer"])
    m2 = M.load_model(tmp_path / "run")
    assert m2.heads == ("lm", "adapter") and m2.config == m.config
    emb = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(m2(ids), m(ids)) and torch.equal(m2(ids, emb=emb), m(ids, emb=emb))
    with pytest.raises(ValueError, match="reserved"):
        M.save_checkpoint(tmp_path / "x.pt", m, config={})


def test_vocab_hash_saved_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(M.tokenizer, "VOCAB_HASH", "aaaa")
    m = random_model()
    M.save_checkpoint(tmp_path / "a.pt", m)
    assert M.load_checkpoint(tmp_path / "a.pt")["vocab_hash"] == "aaaa"
    monkeypatch.setattr(M.tokenizer, "VOCAB_HASH", "bbbb")
    with pytest.warns(UserWarning, match="vocabulary hash"):
        M.load_model(tmp_path / "a.pt")


def test_export_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    m = random_model(heads=("cls",), class_size=3, vocab_size=M.VOCAB_SIZE)
    M.export_safetensors(m, tmp_path / "cl.safetensors")
    cfg = json.loads((tmp_path / "cl.json").read_text())
    assert cfg == {k: v for k, v in vars(m.config).items() if v is not None}
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "cl.safetensors"))
    assert set(sd) == set(m.state_dict())  # the official key names, no wrapper prefixes
    m2 = M.load_model(tmp_path / "cl.safetensors")
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(m2(ids), m(ids))


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(M.CheckpointError, match="cannot pick"):
        M.resolve_checkpoint(tmp_path)
    with pytest.raises(M.CheckpointError, match="no such file"):
        M.resolve_checkpoint(tmp_path / "absent")
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert M.resolve_checkpoint(tmp_path).name == "a.safetensors"  # the only one
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(M.CheckpointError, match="2 \\*.pt"):
        M.resolve_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert M.resolve_checkpoint(tmp_path).name == "model.safetensors"  # the official name
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert M.resolve_checkpoint(tmp_path).name == "ckpt.pt"  # ours first
    assert M.resolve_checkpoint(tmp_path / "b.pt").name == "b.pt"  # a file as is


class Evil:  # a custom class: weights_only loading must refuse it
    pass


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "song.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0MTrk\x00\x00\x00\x00")
    torch.save({"model": {"w": torch.zeros(2)}, "evil": Evil()}, tmp_path / "evil.pt")
    m = random_model(vocab_size=100)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "vocab100.safetensors"))  # no config: vocab checked against 17727
    (tmp_path / "cfg").mkdir()
    save_file(sd, str(tmp_path / "cfg" / "w.safetensors"))  # config.json beside says 17727
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**vars(m.config), "vocab_size": M.VOCAB_SIZE}))
    partial = dict(sd)
    del partial["model.encode_layers.1.ff_up_proj.weight"]
    torch.save({"model": partial, "config": vars(m.config)}, tmp_path / "partial.pt")
    extra = {**sd, "model.encode_layers.5.norm1.weight": torch.zeros(64)}
    torch.save({"model": extra, "config": vars(m.config)}, tmp_path / "extra.pt")
    torch.save({"model": sd, "config": {**vars(m.config), "d_model": 32}}, tmp_path / "shape.pt")
    torch.save({"step": 3}, tmp_path / "nomodel.pt")
    cases = {"missing.pt": "no such file", "random.pt": "not a checkpoint", "notes.txt": "not a checkpoint",
             "song.mid": "not a checkpoint", "evil.pt": "weights_only", "vocab100.safetensors": "vocabulary size",
             "cfg/w.safetensors": "vocabulary size", "partial.pt": "missing tensors",
             "extra.pt": "unexpected tensors", "shape.pt": "shape", "nomodel.pt": "no 'model'"}
    for name, msg in cases.items():
        with pytest.raises(M.CheckpointError, match=msg) as e:
            M.load_model(tmp_path / name)
        assert "\n" not in str(e.value) and Path(name).name in str(e.value)
    M.load_model(tmp_path / "extra.pt", strict=False)  # strict=False tolerates unknown tensors only


def test_prefixed_keys_load(tmp_path):
    m = random_model()
    sd = m.state_dict()
    for prefix in ("_orig_mod.", "module."):
        torch.save({"model": {prefix + k: v for k, v in sd.items()}, "config": vars(m.config)}, tmp_path / "p.pt")
        m2 = M.load_model(tmp_path / "p.pt")
        assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), sd.values()))


@torch.no_grad()
def test_load_pretrained_lm_into_new_heads(tmp_path):
    path, io = golden("lm_tiny")
    torch.manual_seed(0)
    e = M.load_model(path, heads=("emb",), emb_size=16, resid_dropout=0.2)
    assert e.heads == ("emb",) and e.emb_head.weight.shape == (16, 64)
    assert e.emb_head.weight.std() > 0 and e.model.encode_layers[1].dropout.p == 0.2
    e.eval()
    close(e.hidden(io["input_ids"]), io["hidden"])  # trunk loaded exactly
    assert e(io["input_ids"]).shape == (2, 40, 16)
    c = M.load_model(path, heads=("cls",), class_size=5)
    assert c(io["input_ids"], out_pos=torch.tensor([3, 39])).shape == (2, 5)
    cnd = M.load_model(path, heads=("lm", "adapter"), emb_size=32)
    close(cnd(io["input_ids"]), io["logits"])


def test_heads_from_the_constructor():
    m = random_model(heads=("lm", "emb", "adapter"), emb_size=8)
    assert m.heads == ("lm", "emb", "adapter") and m.default_head == "lm"
    assert m.emb_head.weight.shape == (8, 64) and m.embedding_adapter.weight.shape == (64, 8)
    c = random_model(heads=("cls",), class_size=4)
    assert c.heads == ("cls",) and c.default_head == "cls"
    ids = torch.randint(0, 97, (2, 5))
    assert c(ids).shape == (2, 5, 4) and m(ids, head="emb").shape == (2, 5, 8)
    with pytest.raises(ValueError, match="no 'lm' head"):
        c(ids, head="lm")
    with pytest.raises(ValueError, match="needs a size"):
        random_model(heads=("cls",))
    with pytest.raises(ValueError, match="output head"):
        random_model(heads=("adapter",), emb_size=8)


@torch.no_grad()
def test_bf16_load_keeps_rope_float32():
    # RoPE angles are computed in float32 from the positions at every call, whatever the weights' dtype
    path, io = golden("lm_tiny")
    m = M.load_model(path, dtype=torch.bfloat16)
    cos, _ = M.rope(torch.arange(4), 16)
    assert cos.dtype == torch.float32 and m.lm_head.weight.dtype == torch.bfloat16
    assert not any("rope" in k for k in m.state_dict())
    close(m(io["input_ids"]), io["logits"], atol=0.1)


def test_import_without_safetensors(tmp_path):
    code = ("import sys; sys.modules['safetensors'] = None; import model; "
            "m = model.Aria(model.ModelConfig(64, 4, 2, vocab_size=50)); "
            "open(sys.argv[1], 'wb').write(b'\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00{' + b' ' * 30)\n"
            "try: model.load_model(sys.argv[1])\n"
            "except model.CheckpointError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.safetensors")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install safetensors" in out.stdout


# -----------------------------------------------------------------------------
# training path


def test_layerwise_dropout():
    m = M.Aria(tiny_cfg(n_layers=5, resid_dropout=0.2))
    assert [round(b.dropout.p, 6) for b in m.model.encode_layers] == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert M.Aria(tiny_cfg(n_layers=1, resid_dropout=0.2)).model.encode_layers[0].dropout.p == 0.0


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grad_checkpoint_same_loss_and_grads(p):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        m = random_model(grad_checkpoint=ckpt, resid_dropout=p).train()
        torch.manual_seed(123)  # same dropout masks; non-reentrant checkpoint replays the RNG
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), [q.grad.clone() for q in m.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(g0, g1))


def saved_bytes(m, fn):
    """Bytes of the activations autograd keeps for backward while fn() runs (unique storages, the
    parameters not counted): what activation checkpointing must shrink."""
    params, seen = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_grad_checkpoint_keeps_less_for_backward(monkeypatch):
    # by its effect: what a block keeps for backward shrinks to its float32 input (B, T, d), the
    # block being recomputed in backward; a checkpoint() that just called the block would keep it all
    ids = torch.randint(0, 97, (2, 64))
    kept = {}
    for flag in (False, True):
        for L in (3, 4):
            m = random_model(grad_checkpoint=flag, n_layers=L).train()
            kept[flag, L], out = saved_bytes(m, lambda: m(ids))
            out.float().mean().backward()  # and the recompute works
            assert all(q.grad is not None for q in m.parameters())
    block = {flag: kept[flag, 4] - kept[flag, 3] for flag in (False, True)}
    assert block[True] == 2 * 64 * 64 * 4 and block[False] > 10 * block[True], block  # as plan_batch counts
    monkeypatch.setattr(M, "checkpoint", lambda fn, *a, **k: fn(*a))  # a checkpoint that recomputes nothing
    m = random_model(grad_checkpoint=True, n_layers=3).train()
    assert saved_bytes(m, lambda: m(ids))[0] == kept[False, 3]
    with torch.no_grad():
        assert saved_bytes(m.eval(), lambda: m(ids))[0] == 0


def test_chunked_lm_loss_equals_the_full_one():
    # float32: the same loss and every gradient within 1e-5 relative, <P> targets ignored
    m = random_model(n_layers=2).train()
    batch = torch.randint(6, 97, (4, 226), generator=torch.Generator().manual_seed(1))
    batch[0, -40:] = M.tokenizer.PAD_ID
    res = []
    for fn in (lambda: torch.nn.functional.cross_entropy(m(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten(),
                                                         ignore_index=M.tokenizer.PAD_ID),
               lambda: TR.LMLoss(m, chunk=128)(batch)):  # 900 positions: 8 chunks, the last one short
        m.zero_grad()
        loss = fn()
        loss.backward()
        res.append((loss.detach(), {k: q.grad.clone() for k, q in m.named_parameters()}))
    (l0, g0), (l1, g1) = res
    assert l1.dtype == torch.float32 and abs(l1 - l0) / l0 < 1e-6
    for k in g0:
        assert ((g1[k] - g0[k]).norm() / g0[k].norm()).item() < 1e-5, k
    with torch.no_grad():  # evaluation: no recompute bookkeeping, the same value
        assert abs(TR.LMLoss(m, chunk=128)(batch) - l0) / l0 < 1e-6
    # what the chunking is for: the kept activations no longer hold (N, V) float32 logits
    big = random_model(n_layers=1, vocab_size=4000, max_seq_len=1024).train()
    ids = torch.randint(6, 4000, (1, 1025))
    full, _ = saved_bytes(big, lambda: torch.nn.functional.cross_entropy(big(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten()))
    chunked, _ = saved_bytes(big, lambda: TR.LMLoss(big, chunk=128)(ids))
    trunk, _ = saved_bytes(big, lambda: big.hidden(ids[:, :-1]))
    # chunked keeps the trunk's activations and the head's gradients (dh (N, d), dw (V, d)), not (N, V)
    assert full >= trunk + 1024 * 4000 * 4 and chunked <= trunk + (1024 + 4000) * 64 * 4 + 1024 * 8, (trunk, full, chunked)


def test_chunked_lm_loss_compiles_as_one_graph():
    # what pretrain.py compiles on CUDA: the whole loss module, one graph (no break); backend "eager"
    # checks the tracing without a C++ toolchain, "aot_eager" the traced backward too
    torch._dynamo.reset()
    m = random_model(n_layers=2).train()
    batch = torch.randint(6, 97, (2, 200), generator=torch.Generator().manual_seed(2))
    ref = TR.LMLoss(m, chunk=128)(batch)
    ref.backward()
    g0 = {k: q.grad.clone() for k, q in m.named_parameters()}
    for backend in ("eager", "aot_eager"):
        m.zero_grad()
        loss = torch.compile(TR.LMLoss(m, chunk=128), backend=backend, fullgraph=True)(batch)
        loss.backward()
        assert abs(loss.item() - ref.item()) < 1e-6 and all(torch.allclose(q.grad, g0[k], atol=1e-6) for k, q in m.named_parameters())
    torch._dynamo.reset()


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
def test_plan_batch_arithmetic_covers_what_autograd_keeps(amp):
    # the planner's arithmetic (per token and layer) against a count of the saved tensors, at
    # tiny's and medium's widths: never below, at most 15% above
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    for d, heads in ((128, 2), (768, 12)):
        kept = {}
        for L in (1, 2):
            m = M.Aria(M.ModelConfig(d_model=d, n_heads=heads, n_layers=L, max_seq_len=512)).train()
            with ctx:
                kept[L] = {T: saved_bytes(m, lambda: m.hidden(torch.randint(6, 1000, (1, T))))[0] for T in (128, 256)}
        per_token_layer = ((kept[2][256] - kept[1][256]) - (kept[2][128] - kept[1][128])) / 128
        cfg = M.ModelConfig(d_model=d, n_heads=heads, n_layers=1)
        need = lambda T, ck: TR.plan_batch(cfg, T, 1, "cpu", 1, ck, amp)[2]  # noqa: E731  bytes for 1 x T tokens
        model_says = need(1, "0") - need(0, "0") - 8 * d
        assert per_token_layer <= model_says <= 1.15 * per_token_layer, (d, per_token_layer, model_says)
        assert need(1, "1") - need(0, "1") >= per_token_layer  # checkpointed: one block is recomputed at a time


def test_plan_batch_reaches_the_papers_batch_with_micro_batches_that_fit():
    med, gib = M.PRESETS["medium"], 2**30
    plan = lambda cap, **kw: TR.plan_batch(med, 8192, 16, "cpu", capacity=cap * gib, **kw)[:2]  # noqa: E731
    assert plan(79) == (4, False)    # H100 80 GB: 4 micro-batches of 4, no recompute
    assert plan(139) == (8, False)   # H200
    assert plan(39) == (1, False)    # A100 40 GB
    assert plan(22) == (2, True)     # a 24 GB card: checkpointing, then the largest micro-batch that fits
    assert plan(79, micro=2) == (2, False) and plan(79, grad_ckpt="1") == (16, True) and plan(79, grad_ckpt="0", micro=16) == (16, False)
    assert plan(4) == (1, True)      # nothing fits: the smallest (and an out-of-memory error will say what to change)
    for cap in (79, 139, 39, 22):
        assert TR.plan_batch(med, 8192, 16, "cpu", capacity=cap * gib)[2] <= 0.8 * cap * gib
    assert TR.plan_batch(med, 8192, 16, "cpu")[:2] == (16, False)  # no memory figure: the whole batch
    assert "micro-batches of 4 x 8192 (4 per step), activation checkpointing off; estimated" in TR.plan_batch(
        med, 8192, 16, "cpu", capacity=79 * gib)[3]
    with pytest.raises(SystemExit, match="does not divide"):
        TR.plan_batch(med, 8192, 16, "cpu", micro=3)


def test_cnd_training_touches_adapter():
    # DDP-safe: without a condition the adapter still receives a (zero) gradient
    m = random_model(heads=("lm", "adapter"), emb_size=8).train()
    m(torch.randint(0, 97, (2, 8))).sum().backward()
    assert m.embedding_adapter.weight.grad is not None
    assert torch.count_nonzero(m.embedding_adapter.weight.grad) == 0


def test_perf_helpers():
    med = M.PRESETS["medium"]
    with torch.device("meta"):
        n = M.Aria(med).num_params(exclude_embedding=True)
    assert TR.flops_per_token(med, 8192) == 6 * n + 12 * 16 * 1536 * 8192
    assert TR.flops_per_token(med, 8192, lm_head=False) == 6 * (n - 1536 * M.VOCAB_SIZE) + 12 * 16 * 1536 * 8192
    f = TR.flops_per_token(med, 8192)
    assert TR.estimate_mfu(med, 8192, 1e4, "NVIDIA H100 80GB HBM3") == pytest.approx(f * 1e4 / 989e12)
    assert TR.estimate_mfu(med, 8192, 1e4, "NVIDIA H100 PCIe") == pytest.approx(f * 1e4 / 756e12)
    assert TR.estimate_mfu(med, 8192, 1e4, "cpu") is None
    assert TR.estimate_mfu(med, 8192, 1e4, "NVIDIA A100-SXM4-80GB") == pytest.approx(f * 1e4 / 312e12)
    opt = TR.configure_optimizer(random_model(), lr=3e-4)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.1
    assert len(opt.param_groups) == 1  # official: weight decay on every parameter
    assert M.ModelConfig.from_dict({"d_model": 8, "n_heads": 2, "n_layers": 1, "foo": 1}).d_model == 8
    assert [TR.lr_at(s, 1.0, 10, 110) for s in (0, 9, 10, 60, 110, 200)] == pytest.approx([0.1, 1, 1, 0.55, 0.1, 0.1])
    assert TR.lr_at(110, 1.0, 10, 110, final_frac=0.0) == 0.0
    assert TR.autocast_dtype("auto", "cpu") is None and TR.autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    assert TR.autocast_dtype("auto", "cuda") == torch.bfloat16 and TR.autocast_dtype("float32", "cuda") is None


def test_vocab_size_matches_tokenizer():
    tok = pytest.importorskip("tokenizer")
    assert M.VOCAB_SIZE == tok.VOCAB_SIZE == M.ModelConfig(8, 1, 1).vocab_size
    assert isinstance(tok.VOCAB_HASH, str)


@torch.no_grad()
def test_cache_read_bound_equals_whole_cache():
    # int positions (exact length, no mask, causal prefill), tensor positions with a bucketed
    # kv_len, and the whole masked cache give the same logits as the full forward
    torch.manual_seed(0)
    m = M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128)).eval()
    ids = torch.randint(6, M.VOCAB_SIZE, (2, 40))
    full = m(ids)
    for how in ("int", "bucket", "whole"):
        m.setup_cache(2, 128)
        out = [m(ids[:, :20], input_pos=0 if how == "int" else torch.arange(20))]
        out.append(m(ids[:, 20:25], input_pos=20 if how == "int" else torch.arange(20, 25),
                     kv_len=32 if how == "bucket" else None))  # a chunk at an offset: offset-causal
        for t in range(25, 40):
            pos = t if how == "int" else torch.tensor([[t], [t]])
            out.append(m(ids[:, t:t + 1], input_pos=pos, kv_len=64 if how == "bucket" else None))
        close(torch.cat(out, 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="cache length"):
        m(ids[:, :1], input_pos=128)


def test_compiled_cache_write_stays_in_place():
    # inductor's code for a compiled decode step must write the KV cache in place: no buffer
    # of the cache's size and no loop over all of it (scatter_ made both: ~1 GB per step for
    # medium at a 2.5k context)
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    m = M.Aria(M.ModelConfig(d_model=64, n_heads=1, n_layers=1, max_seq_len=4096)).eval()
    m.setup_cache(2, 4096)
    step = torch.compile(lambda tok, pos: m(tok, input_pos=pos, kv_len=256), fullgraph=True)
    torch._dynamo.reset()
    tok, pos = torch.tensor([[7], [9]]), torch.tensor([[5], [130]])
    with torch.no_grad():
        out, code = run_and_get_code(step, tok, pos)
    torch._dynamo.reset()
    code = "\n".join(code)
    cache = m.model.encode_layers[0].kv_cache
    assert torch.equal(cache.k[1, :, 130] != 0, torch.ones_like(cache.k[1, :, 130], dtype=torch.bool))
    shape, numel = str(tuple(cache.k.shape)), cache.k.numel()
    assert f"empty_strided_cpu({shape}" not in code and f"< static_cast<int64_t>({numel}L)" not in code
