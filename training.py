"""
Small helpers that the training scripts' own loops (pretrain.py, finetune_*.py) call in one line:
DDP set-up, autocast and AdamW as the paper ran them, the learning-rate schedule (paper §4.1),
FLOPs and MFU, the chunked LM loss, the micro-batch planner, the data order and --resume.
Each script still carries its whole loop in the open; this file holds no loop.
"""
import hashlib
import os
import sys
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tokenizer
from model import CheckpointError, ModelConfig




Process = namedtuple("Process", "rank world device")
Plan = namedtuple("Plan", "micro grad_ckpt bytes line")


def setup_distributed(device="auto", tf32=True):
    """-> (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU. On CUDA, float32
    matmuls run in TF32 unless tf32=False (what runs under bf16 autocast is not affected)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device == "auto":
        device = next(d for d, ok in available.items() if ok)
    if not available[device.split(":")[0]]:
        raise SystemExit(f"--device {device}: not available on this machine")  # one line, exit status 1
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if "RANK" not in os.environ:
        return Process(0, 1, torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Process(rank, world, torch.device(device))


def autocast_dtype(name, device) -> torch.dtype | None:
    """--dtype -> the autocast dtype, None for float32. auto: bfloat16 on CUDA (the paper's H100 runs),
    float32 elsewhere. bfloat16 on CPU is CPU autocast: what CUDA will do, on CPU."""
    on_cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if name == "bfloat16" or (name == "auto" and on_cuda) else None


def configure_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5, device_type="cpu"):
    # official recipe (aria/training/train.py): weight decay on *all* parameters, LayerNorm and
    # embeddings included. The paper does not say; we keep the official behaviour.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                             fused=device_type == "cuda")


def lr_at(step, lr, warmup, total, final_frac=0.1):
    """Paper §4.1: linear warmup for `warmup` steps, then linear decay to final_frac*lr at
    `total` (final_frac 0.1 for pretraining, 0 to anneal to zero)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (1.0 - (1.0 - final_frac) * frac)


# dense bf16 peak (no sparsity), matched as substrings of the device name, specific names first
GPU_PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                       "A100": 312e12}


def flops_per_token(cfg: ModelConfig, seq_len: int, lm_head: bool = True) -> float:
    """Training FLOPs per token, PaLM/nanoGPT convention: 6N + 12*L*d*T. N = non-embedding
    parameters (the embedding is a lookup); the vocab-wide lm_head is counted, an emb/cls head
    read at one position per sequence is not. 12*L*d*T: QK^T and AV, no causal halving."""
    d, L = cfg.d_model, cfg.n_layers
    n = L * (4 * d * d + 3 * cfg.ff_mult * d * d + 4 * d) + 2 * d + (d * cfg.vocab_size if lm_head else 0)
    return 6 * n + 12 * L * d * seq_len


def estimate_mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, device_name=None, lm_head=True,
                 peak=None):
    """MFU in [0, 1] of one device at its own tokens_per_s; peak FLOP/s given or by name (else
    None: CPU, unknown GPUs)."""
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    name = (device_name or "").lower()
    peak = peak or next((f for k, f in GPU_PEAK_BF16_FLOPS.items() if name and k.lower() in name), None)
    return None if peak is None else flops_per_token(cfg, seq_len, lm_head) * tokens_per_s / peak


class _HeadCE(torch.autograd.Function):
    """Cross-entropy of F.linear(h, w) summed over the rows whose target is not <P>, chunk by chunk,
    with the gradients from the same pass (no logits kept or recomputed); matmuls under the caller's
    autocast, softmax and loss in float32."""

    @staticmethod
    def forward(ctx, h, w, y, chunk, grad):
        ctx.w_dtype = w.dtype
        total = h.new_zeros((), dtype=torch.float32)
        dh = torch.empty_like(h) if grad else None
        dw = 0
        for i in range(0, len(y), chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk, None]
            keep = yc != tokenizer.PAD_ID
            logits = F.linear(hc, w)  # (n, V)
            with torch.autocast(h.device.type, enabled=False):
                logp = logits.float().log_softmax(-1)
                total = total - (logp.gather(1, yc) * keep).sum()
                if grad:  # d/dlogits = softmax - onehot(target), in place; rows of <P> targets masked below
                    g = logp.exp_().scatter_add_(1, yc, torch.full_like(logp[:, :1], -1.0)).to(logits.dtype)
            if grad:
                dh[i:i + chunk] = (g @ w) * keep
                dw = dw + (g.T @ (hc * keep)).float()
        ctx.save_for_backward(dh, dw if grad else None)
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        return dh * g, (dw * g).to(ctx.w_dtype), None, None, None


class LMLoss(nn.Module):
    """LMLoss(model)(batch (B, T+1) ids) -> F.cross_entropy(model(batch[:, :-1]).float(), batch[:, 1:])
    without <P> targets or the (B, T, V) logits (_HeadCE, 2048 positions a chunk: 145 MB). A module:
    DDP and compile wrap it whole."""

    def __init__(self, model, chunk=2048):
        super().__init__()
        self.lm, self.chunk = model, chunk

    def forward(self, batch):
        h = self.lm.hidden(batch[:, :-1]).flatten(0, 1)  # (B*T, d)
        y = batch[:, 1:].flatten()
        w = self.lm.lm_head.weight
        grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
        return _HeadCE.apply(h, w, y, self.chunk, grad) / (y != tokenizer.PAD_ID).sum()


def plan_batch(cfg, seq_len, batch, device, micro=0, grad_ckpt="auto", amp=True, lm_head=True, capacity=None):
    """-> (micro-batch, checkpointing, bytes, a line saying so) for `batch` sequences per process and step:
    the largest divisor of batch that fits 80% of the GPU (free + held by torch), without checkpointing
    if one fits; a given micro (> 0) or grad_ckpt ("0"/"1") stays; CPU, MPS: the whole batch. Bytes: 16
    a parameter (+2: autocast's bf16 copies); per token and layer 60·d kept for backward under bf16, 106·d
    in float32 (58·d, 104·d counted: tests/test_model.py), 4·d checkpointed (+ one block); 2 x 2048
    logits."""
    if micro and batch % micro:
        raise SystemExit(f"--micro_batch {micro} does not divide --batch_size {batch}")
    if capacity is None and torch.device(device).type == "cuda":
        capacity = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    d, L = cfg.d_model, cfg.n_layers
    V = cfg.vocab_size
    act = 60 if amp else 106
    fixed = (flops_per_token(cfg, 0, lm_head) // 6 + d * V) * (18 if amp else 16)
    fixed += 2 * 2048 * V * 8 if lm_head else 0
    plans = {(ck, m): fixed + m * seq_len * d * (4 * L + 2 * act + 8 if ck else act * L + 8)
             for ck in ([False, True] if grad_ckpt == "auto" else [grad_ckpt == "1"])
             for m in ([micro] if micro else [m for m in range(batch, 0, -1) if batch % m == 0])}
    fitting = (p for p, need in plans.items() if capacity is None or need <= 0.8 * capacity)
    ckpt, m = next(fitting, list(plans)[-1])  # the smallest plan when none fits: an OOM will say so
    fits = f"; estimated {plans[ckpt, m] / 2**30:.1f} of {capacity / 2**30:.1f} GiB" if capacity else ""
    line = (f"micro-batches of {m} x {seq_len} ({batch // m} per step), "
            f"activation checkpointing {'on' if ckpt else 'off'}{fits}")
    return Plan(m, ckpt, plans[ckpt, m], line)


def stratified_split(names, labels, valid_frac=0.1, test_frac=0.1):
    """Per class, files ordered by a hash of their CSV path (stable, independent of --seed): the first
    round(test_frac * n) -> test, the next round(valid_frac * n) -> valid (at least 1 each if n >= 3)."""
    out = ["train"] * len(names)
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        idx.sort(key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
        k_test, k_valid = (max(round(f * len(idx)), int(f > 0 and len(idx) >= 3))
                           for f in (test_frac, valid_frac))
        for j, i in enumerate(idx[:k_test + k_valid]):
            out[i] = "test" if j < k_test else "valid"
    return out


class StepSampler(torch.utils.data.Sampler):
    """This rank's sample indices from `step` on: micro-batch (step, micro) of rank r holds samples
    ((step * accum + micro) * world + r) * B + [0, B). Datasets map an index g to its sample (epoch g // len,
    shuffled by seed and epoch): a step's global batch is the same for any number of processes and
    micro-batches."""

    def __init__(self, step, batch_size, accum, rank, world):
        self.step = step
        self.b, self.a = batch_size, accum
        self.r, self.w = rank, world

    def __iter__(self):
        k = self.step * self.a  # micro-step k = step * accum + micro
        while True:
            yield from range((k * self.w + self.r) * self.b, (k * self.w + self.r + 1) * self.b)
            k += 1


PER_RUN_OPTIONS = {"resume", "stop_at", "device", "workers", "compile", "micro_batch", "grad_checkpoint",
                   "peak_tflops"}


def resume_args(args, parser, argv=None):
    """With --resume, the settings saved in OUT/ckpt.pt come back; only options typed on this
    command line override them (e.g. a longer --max_iters), and PER_RUN_OPTIONS (how to run a job,
    not the run) are never restored: a run started on CPU may resume on a GPU."""
    if not args.resume:
        return args
    ckpt_path = Path(args.out) / "ckpt.pt"
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: nothing to resume (no checkpoint in {args.out})")
    # mmap: only the settings are read, not gigabytes of weights and optimizer moments
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("args", {})
    argv = sys.argv[1:] if argv is None else argv
    # the options typed: parse again with every default suppressed, so only those remain
    unset = object()
    parser.set_defaults(**{k: unset for k in vars(args)})
    typed = {k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v is not unset}
    if "grad_accum" in saved and not hasattr(args, "grad_accum"):  # older checkpoints: batch per micro-step
        saved["batch_size"] *= saved["grad_accum"]
    for k, v in saved.items():
        if k not in typed and k not in PER_RUN_OPTIONS and hasattr(args, k):
            setattr(args, k, v)
    return args
