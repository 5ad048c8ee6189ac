"""The CUDA numerics, mirrored on CPU: every stage's loss under bf16 autocast (what CUDA runs) against
float32. Autocast runs matmuls in bf16 even on float32 inputs, so whatever needs float32 (losses,
similarities, softmaxes, read-out heads) must be computed outside it; these tests fail when it is not."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_cls as FC  # noqa: E402
import finetune_contrastive as C  # noqa: E402
import finetune_gen as G  # noqa: E402
import model as M  # noqa: E402
import pretrain as P  # noqa: E402
import tokenizer as T  # noqa: E402

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
FP32 = contextlib.nullcontext()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(heads, **kw):
    torch.manual_seed(0)
    cfg = M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, **kw)
    return M.Aria(cfg, heads).train()


def loss_and_grads(fn, model, autocast):
    model.zero_grad()
    loss = fn(autocast)
    loss.backward()
    return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def view_batch(B=8, L=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(T.NOTE_START, T.DRUM_START, (B, 2, L), generator=g)
    eos = torch.randint(L // 2, L, (B, 2), generator=g)
    ids[torch.arange(B)[:, None], torch.arange(2)[None], eos] = T.EOS_ID
    return ids, eos


def test_contrastive_loss_keeps_float32_precision_on_near_identical_embeddings():
    # An undertrained trunk gives nearly the same hidden state at every <E>: here the final
    # LayerNorm's bias dominates, cosines > 0.9999 (what an LM pretrained for a few steps gives).
    # A bf16 read-out head or a bf16 similarity matrix rounds the differences between the
    # embeddings away, and the gradient becomes rounding noise: the loss then sits at ln(2N-1).
    m = tiny(("emb",), emb_size=32)
    with torch.no_grad():
        m.model.out_layer_norm.bias.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        m.model.out_layer_norm.weight.fill_(0.05)
        z1, z2, _ = C.embed_pairs(m, view_batch())
        z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1)
        assert (z @ z.T).min() > 0.9999
    for loss in ("ntxent", "official"):
        fn = lambda ac: C.contrastive_loss(m, view_batch(), ac, loss, 0.1)[0]  # noqa: E731
        l32, g32 = loss_and_grads(fn, m, FP32)
        l16, g16 = loss_and_grads(fn, m, BF16)
        assert l16.dtype == torch.float32
        assert abs(l16.item() - l32.item()) / l32.item() < 1e-3
        # with the head or the similarities in bf16 these errors are 100% and more
        assert rel(g16["emb_head.weight"], g32["emb_head.weight"]) < 0.1, loss
        assert rel(g16["model.encode_layers.0.mixed_qkv.weight"], g32["model.encode_layers.0.mixed_qkv.weight"]) < 0.1


def test_read_out_heads_run_in_float32_under_autocast():
    for heads, kw in ((("emb",), dict(emb_size=16)), (("cls",), dict(class_size=3))):
        m = tiny(heads, **kw).eval()
        ids, eos = torch.randint(0, 100, (2, 12)), torch.tensor([5, 11])
        with BF16:
            out = m(ids, out_pos=eos)
        assert out.dtype == torch.float32
    lm = tiny(("lm",))
    with BF16:
        assert lm(ids).dtype == torch.bfloat16  # the LM head stays a bf16 matmul (its loss is float32)


@pytest.mark.parametrize("stage", [P, G])
def test_next_token_loss_is_float32_and_close_to_float32(stage):
    m = tiny(("lm",))
    batch = torch.randint(T.NOTE_START, T.VOCAB_SIZE, (4, 65), generator=torch.Generator().manual_seed(0))
    batch[:, -5:] = T.PAD_ID  # padding is ignored in both
    l32, g32 = loss_and_grads(lambda ac: stage.next_token_loss(m, batch, ac), m, FP32)
    l16, g16 = loss_and_grads(lambda ac: stage.next_token_loss(m, batch, ac), m, BF16)
    assert l16.dtype == torch.float32 and abs(l16.item() - l32.item()) / l32.item() < 1e-2
    assert rel(g16["lm_head.weight"], g32["lm_head.weight"]) < 0.05


def test_classifier_loss_and_file_prediction_are_float32():
    m = tiny(("cls",), class_size=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(T.NOTE_START, T.DRUM_START, (6, 40), generator=g)
    eos = torch.tensor([39, 30, 20, 39, 10, 25])
    ids[torch.arange(6), eos] = T.EOS_ID
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    l32, g32 = loss_and_grads(lambda ac: FC.cls_loss(m, (ids, eos, y), ac)[0], m, FP32)
    l16, g16 = loss_and_grads(lambda ac: FC.cls_loss(m, (ids, eos, y), ac)[0], m, BF16)
    assert l16.dtype == torch.float32 and abs(l16.item() - l32.item()) / l32.item() < 1e-2
    assert rel(g16["class_head.weight"], g32["class_head.weight"]) < 0.05
    slices = [[ids[i, :eos[i] + 1].numpy().astype("uint16") for i in range(3)], [ids[3, :40].numpy().astype("uint16")]]
    p32 = FC.predict_files(m, slices, "cpu")
    p16 = FC.predict_files(m, slices, "cpu", autocast=BF16)
    assert p16.dtype == torch.float64 and torch.allclose(p16.sum(1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(p16, p32, atol=2e-2)


def test_cli_dtype_bfloat16_on_cpu_trains_and_logs_float32_losses(tmp_path):
    data = tmp_path / "ds"
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--synthetic", "12", "--out", str(data), "--workers", "1"],
                   check=True, capture_output=True, env=ENV, cwd=ROOT)
    first = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        r = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--data", str(data), "--out", str(out),
                            "--preset", "tiny", "--seq_len", "64", "--batch_size", "2", "--max_iters", "2",
                            "--log_interval", "1", "--workers", "0", "--device", "cpu", "--dtype", dtype],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert (f"autocast {dtype}" if dtype == "bfloat16" else "float32;") in r.stdout
        first[dtype] = [json.loads(line) for line in open(out / "log.jsonl")][0]["loss"]
    assert abs(first["bfloat16"] - first["float32"]) / first["float32"] < 1e-2
