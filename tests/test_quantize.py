"""Weight quantization for sampling (model.quantize, sample.py/bench.py --quantize): each layer
computes with its stored weights, the weight-only path gives the tokens of its float twin, the
path that also quantizes activations meets the fidelity goals on a trained model, and quantized
checkpoints save, load and sample."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import quantize as Q  # noqa: E402
import sample as S  # noqa: E402
import tokenizer as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.usefixtures("one_thread")


class Twin(torch.nn.Linear):
    """A QLinear's float twin: its dequantized weight, in float32; `bf16` rounds the input and
    output as the int4 CPU kernel does (it takes and returns bf16; the weight is its only other
    approximation)."""

    def forward(self, x):
        if not self.bf16:
            return super().forward(x)
        return super().forward(x.bfloat16().float()).bfloat16().to(x.dtype)


def dequantized(model):
    """A float copy of a quantized model: every QLinear replaced by its Twin."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Q.QLinear):
                w = child.dequantize()
                lin = Twin(w.shape[1], w.shape[0], bias=False)
                lin.weight.data, lin.bf16 = w, child.bits == 4
                setattr(parent, name, lin)
    return model


def piece(k, n=120):
    """A made-up piano performance: arpeggios that shift with k (1 tick = 1 ms)."""
    return T.notes_to_midi([(i * 150, i * 150 + 300 + 40 * (i % 3), 48 + (5 * i + 7 * k) % 30, 50 + 10 * (i % 4), 0)
                            for i in range(n)], {0: 0})


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_computes_with_its_stored_weights(bits):
    torch.manual_seed(0)
    w = torch.randn(40, 256) * 0.05  # 40 rows: the int4 kernel pads to 48
    q = Q.QLinear(40, 256, bits, group_size=64).quantize_(w)
    twin = q.dequantize()
    assert twin.shape == w.shape
    err = (twin - w).norm() / w.norm()
    assert 0 < err < (0.01 if bits == 8 else 0.12)  # it is quantized, and not by much
    for rows in (1, 7):  # a decode step, a prefill
        x = torch.randn(3, rows, 256)
        y, ref = q(x), F.linear(x, twin)
        assert y.shape == (3, rows, 40)
        # int8: activations quantized per row on the fly (1/255 of the row's range); int4: bf16
        assert (y - ref).norm() / ref.norm() < (0.02 if bits == 8 else 0.005)
    if bits == 4:  # smaller groups, closer weights: the option does what it says
        err32 = (Q.QLinear(40, 256, 4, group_size=32).quantize_(w).dequantize() - w).norm() / w.norm()
        assert err32 < 0.9 * err


def test_int8_scales_are_per_output_channel():
    # rows whose ranges differ by 1000x: with one scale per row each keeps its own rounding error;
    # one scale for the whole matrix would round the small rows to nothing
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.logspace(-3, 0, 8)[:, None]
    deq = Q.QLinear(8, 64, 8).quantize_(w).dequantize()
    step = w.abs().amax(1, keepdim=True) / 127  # each row's own rounding step
    assert ((deq - w).abs() <= step / 2 + 1e-9).all()
    assert (deq[0] - w[0]).norm() < 0.01 * w[0].norm()  # the smallest row is not rounded away


def test_quantize_replaces_the_trunk_and_lm_head_only():
    torch.manual_seed(0)
    m = Q.quantize(M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, emb_size=8), ("lm", "emb")).eval(), "int4")
    q = [name for name, mod in m.named_modules() if isinstance(mod, Q.QLinear)]
    assert len(q) == 2 * 5 + 1 and "lm_head" in q
    assert isinstance(m.emb_head, torch.nn.Linear) and isinstance(m.model.tok_embeddings, torch.nn.Embedding)
    assert m.num_params() == M.Aria(m.config, ("lm", "emb")).num_params()  # counts the quantized weights
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(m, "int8")
    with pytest.raises(ValueError, match="groups of 48"):
        Q.quantize(M.Aria(m.config).eval(), "int4", group_size=48)


@torch.no_grad()
def test_weight_only_int4_gives_the_greedy_tokens_of_its_float_twin():
    prompt = T.tokenize(T.load_midi(_bytes(piece(0))), dim=False, eos=False)[:120]
    for seed in range(3):
        torch.manual_seed(seed)
        q = Q.quantize(M.Aria(M.ModelConfig(d_model=128, n_heads=2, n_layers=2, max_seq_len=512)).eval(), "int4")
        rows = S.generate(q, prompt, 2, 80, temp=0)
        assert rows == S.generate(dequantized(q), prompt, 2, 80, temp=0)
        assert len(rows[0]) > len(prompt)


def _bytes(midi):
    import io
    f = io.BytesIO()
    midi.save(file=f)
    return f.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model fitted to made-up performances (peaked next-token distributions, as a real
    model's), saved as run/ckpt.pt, and a dataset whose val.bin holds those pieces (fidelity to
    float32 is measured, not generalisation)."""
    d = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    data = torch.tensor([i for k in range(8) for i in T.tokenize(T.load_midi(_bytes(piece(k))), dim=False)])
    m = M.Aria(M.ModelConfig(d_model=128, n_heads=2, n_layers=2, max_seq_len=512))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    for _ in range(80):  # to a loss of ~0.3: top-1 agreement means little while the model is unsure
        i = torch.randint(0, len(data) - 97, (8,))
        x = torch.stack([data[j:j + 97] for j in i])
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    M.save_checkpoint(d / "run" / "ckpt.pt", m.eval())
    (d / "ds").mkdir()
    data.numpy().astype(np.uint16).tofile(d / "ds" / "val.bin")
    piece(3, 40).save(str(d / "prompt.mid"))
    return d


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


@pytest.mark.parametrize("mode,goals", [("int8", (0.003, 0.98, 0.003)), ("int4", (0.03, 0.92, 0.02))])
def test_bench_quality_meets_the_fidelity_goals(trained, mode, goals):
    r = run("bench.py", "quality", "--ckpt", trained / "run", "--data", trained / "ds", "--quantize", mode,
            "--seq_len", 256, "--windows", 4, "--threads", 1)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["all"]["positions"] == 4 * 256 and {"note", "onset", "dur"} <= set(res)
    kl, top1, loss = goals
    assert 0 < res["kl"] <= kl and res["top1"] >= top1, res
    assert res["loss"] <= (1 + loss) * res["loss_float32"] and res["loss_float32"] < 1.0, res


def test_quantized_checkpoint_saves_loads_and_samples(trained, tmp_path):
    m = Q.quantize(M.load_model(trained / "run"), "int8")
    M.save_checkpoint(tmp_path / "q8.pt", m)
    back = M.load_model(tmp_path / "q8.pt")
    assert back.quantized == {"mode": "int8", "group_size": 64}
    ids = torch.randint(6, 17000, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    assert (tmp_path / "q8.pt").stat().st_size < 0.7 * (trained / "run" / "ckpt.pt").stat().st_size
    r = run("sample.py", trained / "prompt.mid", "--ckpt", tmp_path / "q8.pt", "--out", tmp_path / "s", "--length", 40,
            "--device", "cpu")
    assert r.returncode == 0 and (tmp_path / "s" / "prompt_1.mid").is_file(), r.stderr
    r = run("sample.py", trained / "prompt.mid", "--ckpt", tmp_path / "q8.pt", "--quantize", "int4", "--device", "cpu")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "already quantized to int8" in r.stderr


def test_sample_cli_quantize_changes_the_logits_and_checks_its_group(trained, tmp_path):
    out = {}
    for mode in ("none", "int4"):
        r = run("sample.py", trained / "prompt.mid", "--ckpt", trained / "run", "--quantize", mode, "--out",
                tmp_path / mode, "--length", 60, "--temp", 0, "--device", "cpu")
        assert r.returncode == 0, r.stderr
        out[mode] = json.loads((tmp_path / mode / "prompt_1.json").read_text())
        assert out[mode]["settings"]["quantize"] == mode
    # int4 weights change the logits by more than rounding, and each CLI run's greedy tokens are what
    # its own model decodes (whether the two happen to pick the same tokens depends on the CPU's kernels)
    n = out["none"]["n_prompt_tokens"]
    prompt = out["none"]["ids"][:n]
    float_model = M.load_model(trained / "run")
    int4 = Q.quantize(M.load_model(trained / "run"), "int4")
    with torch.no_grad():
        a, b = float_model(torch.tensor([prompt])), int4(torch.tensor([prompt]))
    assert (a - b).abs().max() > 4 * torch.finfo(torch.bfloat16).eps * a.abs().max()  # bf16 rounds to eps / 2
    for mode, model in (("none", float_model), ("int4", int4)):
        model.setup_cache(1, n + 60, dtype=S.kv_dtype("auto", model))
        assert S.generate(model, prompt, 1, 60, temp=0)[0] == out[mode]["ids"]
    r = run("sample.py", trained / "prompt.mid", "--ckpt", trained / "run", "--quantize", "int4", "--group_size", 48,
            "--device", "cpu")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--group_size 48" in r.stderr


# -----------------------------------------------------------------------------
# The compact KV cache (--kv): bf16, or int8 with a scale per token and head


def _int8_round(x):
    """What the int8 cache keeps of x (..., Dh): each row rounded on its own 1/127 grid."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / s) * s


class RoundedTwin(M.KVCache):
    """A float32 cache holding exactly the values an int8 cache keeps: the exact twin."""

    def update(self, pos, k, v, kv_len):
        return super().update(pos, _int8_round(k), _int8_round(v), kv_len)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_compact_cache_stores_fewer_bytes_and_attends_over_what_it_stores(dtype):
    torch.manual_seed(0)
    shape = (2, 4, 64, 64)  # (B, H, L, Dh)
    cache, full = Q.CompactKVCache(shape, dtype, "cpu"), M.KVCache(shape, torch.float32, "cpu")
    per_float = full.bytes_per_slot()
    assert cache.bytes_per_slot() == (per_float // 2 if dtype == torch.bfloat16 else per_float * 68 // 256)
    k, v, q = torch.randn(2, 4, 41, 64), torch.randn(2, 4, 41, 64), torch.randn(2, 4, 1, 64)
    cache.update(0, k[:, :, :40], v[:, :, :40], 40)  # a prefill...
    y = cache.attend_one(q, 40, k[:, :, 40:], v[:, :, 40:], 41)  # ...then one decode step reads it
    stored = (lambda x: x.bfloat16().float()) if dtype == torch.bfloat16 else _int8_round
    ref = F.scaled_dot_product_attention(q, stored(k), stored(v))
    assert (y - ref).abs().max() < 1e-5  # exact to its own rounding
    assert (y - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-5  # and it does round
    mask = torch.arange(41) <= torch.tensor([[30], [40]])[:, None, :, None]  # (B, 1, 1, 41): row 0 sees 31
    ym = cache.attend_one(q, torch.tensor([[40], [40]]), k[:, :, 40:], v[:, :, 40:], 41, mask)
    assert (ym[0] - F.scaled_dot_product_attention(q[:1], stored(k)[:1, :, :31], stored(v)[:1, :, :31])[0]
            ).abs().max() < 1e-5
    if "off" not in Q._COMPILED:  # the compiled kernel (a C++ compiler is there) equals the eager ops
        args = (q, cache.k[:, :, :41], cache.v[:, :, :41], *((cache.k_scale[:, :, :41], cache.v_scale[:, :, :41])
                if cache.int8 else (None, None)), None)
        assert (Q._attend_one(*args) - Q._attend_one_eager(*args)).abs().max() < 1e-5


@torch.no_grad()
def test_int8_cache_gives_the_greedy_tokens_of_its_exact_float_twin():
    prompt = T.tokenize(T.load_midi(_bytes(piece(1))), dim=False, eos=False)[:150]
    torch.manual_seed(3)
    m = M.Aria(M.ModelConfig(d_model=128, n_heads=2, n_layers=2, max_seq_len=512)).eval()
    m.setup_cache(2, 512, dtype=torch.int8)
    rows = S.generate(m, prompt, 2, 80, temp=0)
    for layer in m.model.encode_layers:
        layer.kv_cache = RoundedTwin(layer.kv_cache.k.shape, torch.float32, "cpu")
    assert S.generate(m, prompt, 2, 80, temp=0) == rows and len(rows[0]) > len(prompt)


def test_sample_cli_records_the_kv_cache(trained, tmp_path):
    r = run("sample.py", trained / "prompt.mid", "--ckpt", trained / "run", "--kv", "int8", "--out", tmp_path,
            "--length", 30, "--device", "cpu")
    assert r.returncode == 0 and "int8 KV cache" in r.stdout, r.stderr
    assert json.loads((tmp_path / "prompt_1.json").read_text())["settings"]["kv"] == "int8"
