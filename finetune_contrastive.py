"""
Contrastive finetuning of Aria into a MIDI embedding model (paper §3.3, §4.1; official
aria/training/contrastive_finetune.py): the recipe behind aria-medium-embedding. "Official" is
EleutherAI/aria @ b0486c8 and EleutherAI/aria-utils @ e122d03.

    python finetune_contrastive.py --init out/pretrain --data data/mine --out out/emb
    python finetune_contrastive.py --init aria-medium-base/model.safetensors --data data/ft --out out/emb
    python finetune_contrastive.py --init none --preset tiny --data data/mine --out out/emb_scratch
        # the paper's Aria_e=25† ablation (Table 2: without pretraining)
    torchrun --nproc_per_node=8 finetune_contrastive.py --init ... --data ... --out out/emb
    python finetune_contrastive.py --out out/emb --resume        # continue exactly where it stopped
    python embed.py --ckpt out/emb song.mid --out song.npy        # use it

The LM head of a pretrained model is replaced by a fresh linear embedding head (512-d); a slice's
embedding is that head's output at the <E> token appended after the slice's last note. A training
sample is one file of the dataset: two different random contiguous slices of 100-650 notes, each
augmented on its own (pitch ±5, tempo ±20%, velocity ±1 bin) and tokenized as `prefix <S> notes <E>`.
The loss is NT-Xent (paper eq. 2): cosine similarities of the L2-normalized embeddings, each
embedding's positive is the other view of its file and its negatives are all the other 2N-2
embeddings of the batch, both directions, temperature 0.1. Under torchrun the embeddings of all
processes are gathered (with gradients), so the negatives are those of the global batch.

Views from the dataset: prepare.py stores each file as token ids (`prefix <S> body <E>` with
<D>). A view takes the ids of its note window (from its first note's first token up to the first
token of the note after it), puts the file's prefix, <S> and one <T> per 5 s segment before the
window in front, and decodes that with tokenizer.detokenize_notes into notes in ms (durations
already hold the pedal); these become a Score at 1 tick = 1 ms and are tokenized again (no <D>),
which rebases onsets to the window's first note. On the 10 ms grid this re-tokenization is exact,
so a view is what the official code feeds its model for the same notes (ContrastiveDataset.get_slice:
slice the MidiDict's notes, tokenize with metadata={}), except that the official rebasing quantizes
the raw onset difference: onsets may differ by one 10 ms step. No MIDI is re-parsed and only the
window is decoded.

One step embeds the views under autocast (bf16 on CUDA) and computes the loss in float32 outside
it: with near-identical embeddings (a fresh head on an LM trunk) a bf16 similarity matrix rounds
the logits together and its backward cancels to rounding noise, so the loss does not move.
Which file and which slices a sample g holds depends only on (seed, g), as in the other stages:
--resume needs no loader state, and the global batch is the same for any number of processes.
An epoch is ceil(files / pairs per step) steps: every file gives one pair, and the last step of an
epoch is filled up with the first files of that epoch's order (never twice in one batch).
"""
import argparse
import contextlib
import json
import math
import random
import sys
import time
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import tokenizer as T
import training as TR


class Fail(Exception):
    """A one-line error for the user: exit status 1, no traceback."""


# how log records print on stdout (OUT/log.jsonl has them as JSON)
LOG_FORMAT = {"loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "val_top1": "val_top1 {:.4f}",
              "lr": "lr {:.2e}", "ms": "{:.0f} ms/step", "tok_s": "{:,} tok/s per process",
              "mfu": "MFU {:.1%}", "eta_s": "ETA {}s"}


def get_args(argv=None):
    # defaults: paper §4.1 "Contrastive embeddings" and the official aria/training/contrastive_finetune.py
    ap = argparse.ArgumentParser(
        description="Aria contrastive finetune: a pretrained LM -> a MIDI embedding model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init", default=None,
                    help="pretrained checkpoint: a file (official .safetensors or ours) or an output folder; "
                         "none = random init of --preset (paper Table 2, Aria_e=25†)")
    ap.add_argument("--preset", default="tiny", choices=list(M.PRESETS),
                    help="model size for --init none (as pretrain.py)")
    ap.add_argument("--data", default=None,
                    help="dataset folder written by prepare.py (paper §4.1: the finetuning data, "
                         "compositional duplicates kept)")
    ap.add_argument("--out", default="out/emb", help="checkpoint (ckpt.pt) and log.jsonl go here")
    ap.add_argument("--emb_size", type=int, default=512, help="embedding width of the new head (paper §3.3)")
    ap.add_argument("--min_notes", type=int, default=100,
                    help="notes per view at least (paper §3.3; official ContrastiveDataset.get_slice)")
    ap.add_argument("--max_notes", type=int, default=650,
                    help="notes per view at most (paper §3.3; official ContrastiveDataset.get_slice)")
    ap.add_argument("--max_len", type=int, default=2048,
                    help="tokens per view at most, the last forced to <E> (official get_dataloaders: 2048)")
    ap.add_argument("--no_augment", dest="augment", action="store_false",
                    help="turn off the per-view augmentation (on: paper §3.3; the official get_dataloaders "
                         "has it off)")
    ap.add_argument("--loss", default="ntxent", choices=["ntxent", "official"],
                    help="ntxent: paper eq. 2, all 2N-2 other embeddings are negatives; official: the "
                         "official code's B x B cross-view loss (symmetric_nt_xent_loss_cosine)")
    ap.add_argument("--temperature", type=float, default=0.1,
                    help="NT-Xent temperature (paper §4.1: 0.1; the official code hard-codes 0.5)")
    ap.add_argument("--batch_size", type=int, default=16,
                    help="files (= pairs, 2x views) per process per micro-step; neither paper nor official "
                         "code gives one: pretraining's 16 per GPU. Negatives come from all processes")
    ap.add_argument("--grad_accum", type=int, default=1,
                    help="micro-steps per optimizer step (adds no negatives)")
    ap.add_argument("--lr", type=float, default=1e-5,
                    help="peak learning rate (paper §4.1; official get_optim)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="linear warmup steps (default: the official get_optim's 1000, capped at 10%% of "
                         "the run so short runs still decay)")
    ap.add_argument("--final_lr_frac", type=float, default=0.1,
                    help="then linear decay to this fraction of lr (paper §4.1)")
    ap.add_argument("--weight_decay", type=float, default=0.1,
                    help="AdamW, on all parameters; betas (0.9, 0.95), eps 1e-5 (official _get_optim)")
    ap.add_argument("--grad_clip", type=float, default=0.0,
                    help="clip the gradient norm (0: off, as the official code)")
    ap.add_argument("--epochs", type=float, default=25,
                    help="passes over the files, one pair per file each (paper §4.1)")
    ap.add_argument("--max_iters", type=int, default=None, help="optimizer steps (default: from --epochs)")
    ap.add_argument("--stop_at", type=int, default=None,
                    help="stop after this step without ending the schedule (split a run into jobs)")
    ap.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                    help="recompute each block's activations in backward (auto: if the batch does not fit "
                         "the GPU without; it is not split into micro-batches, which would take negatives "
                         "away)")
    ap.add_argument("--eval_interval", type=int, default=None,
                    help="steps between evaluations (default: one epoch; 0: only at the end)")
    ap.add_argument("--eval_files", type=int, default=128,
                    help="validation files per evaluation (their pairs are fixed, without augmentation)")
    ap.add_argument("--log_interval", type=int, default=10, help="steps per log line")
    ap.add_argument("--ckpt_interval", type=int, default=None,
                    help="steps between checkpoints (default: one epoch; and one at the end)")
    ap.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype of the model's forward/backward (the loss is always float32); "
                         "auto: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model on CUDA (1/0)")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense bf16 TFLOP/s for MFU (0: from the GPU's name)")
    ap.add_argument("--seed", type=int, default=0,
                    help="head init (all weights with --init none), data order, slices, augmentation")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    argv = sys.argv[1:] if argv is None else argv
    args = TR.resume_args(ap.parse_args(argv), ap, argv)
    if not args.init or not args.data:
        ap.error("--init and --data are required (unless --resume)")
    return args


# -----------------------------------------------------------------------------
# views: random note slices of a tokenized file


# a random note slice: the notes as a Score at 1 tick = 1 ms, the index of its first note, its note count
Slice = namedtuple("Slice", "score start notes")


def slice_score(ids, rng, min_notes=100, max_notes=650):
    """Token ids of one file (as prepare.py stores it) -> Slice of a random contiguous slice of
    min..max notes. The slice is drawn as tokenizer.random_slice / the official
    ContrastiveDataset.get_slice: length ~ U{min..max}, start ~ U{0..N-min} (0 when N <= min), so
    slices near the end are shorter."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids != T.DIM_ID]
    bos = int(np.flatnonzero(ids == T.BOS_ID)[0])
    cls = T.TOKEN_CLASS[ids]
    events = np.flatnonzero((cls == T.NOTE) | (cls == T.DRUM))  # the first token of every note
    n = len(events)
    if n == 0:
        raise ValueError("no notes")
    length = rng.randint(min_notes, max_notes)
    start = rng.randint(0, n - min_notes) if n > min_notes else 0
    end = min(start + length, n)
    a, b = events[start], events[end] if end < n else len(ids)
    segments = int((ids[bos + 1:a] == T.SEG_ID).sum())  # 5 s segments before the window
    window = np.concatenate([ids[:bos + 1], np.full(segments, T.SEG_ID), ids[a:b]])
    notes, programs = T.detokenize_notes(window)
    score = T.Score(500, notes, [(0, T.DEFAULT_TEMPO)],  # 500 ticks per beat at 120 bpm: 1 tick = 1 ms
                    [(0, ch, p) for ch, p in sorted(programs.items()) if ch != T.DRUM_CHANNEL], [])
    return Slice(score, start, end - start)


def view_slices(ids, rng, min_notes=100, max_notes=650, tries=10):
    """Two slices for the two views, drawn independently as officially (ContrastiveDataset.__getitem__),
    except that a second slice holding exactly the first one's notes is drawn again (up to `tries`
    times; paper §3.3: two *different* slices). Only a file of at most min_notes notes has a single
    slice: its views are the whole file twice, made different by augmentation alone."""
    first = slice_score(ids, rng, min_notes, max_notes)
    for _ in range(tries):
        second = slice_score(ids, rng, min_notes, max_notes)
        if (second.start, second.notes) != (first.start, first.notes):
            break
    return first.score, second.score


def view_tokens(score, rng, max_len=2048, augment=True):
    """A slice's view: `prefix <S> notes <E>` (no <D>, no metadata), augmented, cut to max_len with
    the last token forced to <E> (official ContrastiveDataset.__getitem__). -> int64 array, not padded."""
    x = np.asarray(T.tokenize(score, dim=False), dtype=np.int64)
    if augment:
        x = T.augment(x, rng, fit=False)  # the view's <E> is never cut off
    x = x[(x != T.DIM_ID) & (x != T.PAD_ID)][:max_len]
    if x[-1] != T.EOS_ID:
        x[-1] = T.EOS_ID
    return x


class ViewPairs(torch.utils.data.Dataset):
    """Sample g -> (ids (2, max_len) <P>-padded, <E> positions (2,)): two views of file perm[i % n],
    epoch, i = divmod(g, len), perm drawn from (seed, epoch). len = ceil(n / per_step) * per_step,
    so an epoch ends on a step boundary; the positions past n wrap to the epoch's first files,
    which are not in the same batch as their first pair when per_step <= n. Slices and
    augmentation are drawn from random.Random(f"{seed}:{g}")."""

    def __init__(self, folder, split, per_step, seed, max_len=2048, min_notes=100, max_notes=650,
                 augment=True):
        self.bin = Path(folder) / f"{split}.bin"
        self.offsets = np.load(Path(folder) / f"{split}.idx.npy")
        self.n = len(self.offsets) - 1
        self.per_step, self.seed = per_step, seed
        self.max_len, self.augment = max_len, augment
        self.min_notes, self.max_notes = min_notes, max_notes
        self.steps_per_epoch = max(1, math.ceil(self.n / per_step))
        self.len = self.steps_per_epoch * per_step
        self.tokens, self.perms = None, {}

    def __len__(self):
        return self.len

    def file_of(self, g):
        epoch, i = divmod(g, self.len)
        if epoch not in self.perms:
            self.perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self.perms[epoch][i % self.n])

    def file_ids(self, f):
        if self.tokens is None:  # opened lazily: one memmap per worker process
            self.tokens = np.memmap(self.bin, dtype=np.uint16, mode="r")
        return self.tokens[self.offsets[f]:self.offsets[f + 1]].astype(np.int64)

    def views(self, g, augment=None):
        augment = self.augment if augment is None else augment
        rng = random.Random(f"{self.seed}:{g}")
        ids = self.file_ids(self.file_of(g))
        slices = view_slices(ids, rng, self.min_notes, self.max_notes)
        return [view_tokens(score, rng, self.max_len, augment) for score in slices]

    def __getitem__(self, g):
        v = self.views(g)
        x = torch.from_numpy(np.stack([T.fit_length(x, self.max_len) for x in v]))
        return x, torch.tensor([len(x) - 1 for x in v])


# -----------------------------------------------------------------------------
# losses


def nt_xent(z1, z2, temperature=0.1):
    """Paper eq. 2: z1, z2 (N, E) are the two views' embeddings, pair i = (z1[i], z2[i]). With
    z = [z1; z2] L2-normalized, l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)) over
    all 2N embeddings; the loss is the mean of l(k, k+N) and l(k+N, k) over k (eq. 2's symmetric
    sum divided by N, SimCLR's 1/2N, so it does not grow with the batch)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.arange(2 * n, device=z.device).roll(n)  # n..2n-1, 0..n-1; made on the device, no host copy
    return F.cross_entropy(sim, target)


def official_loss(z1, z2, temperature=0.5):
    """The official symmetric_nt_xent_loss_cosine (contrastive_finetune.py): the N x N cross-view cosine
    similarities / t, (CE(S, arange) + CE(S^T, arange)) / 2; negatives are the other view's
    other items only (N-1, not 2N-2)."""
    a, b = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    s = a @ b.T / temperature
    target = torch.arange(len(a), device=s.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2


LOSSES = {"ntxent": nt_xent, "official": official_loss}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum over ranks of the gradients of its own
    slice (an all_reduce of the full gradient, then the rank's rows): what
    torch.distributed.nn.functional.all_gather does, written out because that one is deprecated
    and, with gloo on torch 2.13, aborts the process at exit after its backward."""

    @staticmethod
    def forward(ctx, z):
        import torch.distributed as dist
        ctx.rank, ctx.rows = dist.get_rank(), z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(z):
    """Concatenate every process's z (B, E) in rank order, keeping the gradient path: the backward
    sums each rank's gradient into the owner's slice, and DDP then averages over ranks, so the
    parameters get the gradient of the global-batch loss."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _GatherWithGrad.apply(z)


def pair_loss(z1, z2, loss="ntxent", temperature=0.1, distributed=True):
    """The contrastive loss of a (micro-)batch, over the global batch when distributed: every
    process computes the same loss on the gathered embeddings (rank-major order, which is the
    order of the one-process batch, see model.StepSampler)."""
    if distributed:
        z1, z2 = gather(z1), gather(z2)
    return LOSSES[loss](z1, z2, temperature)


# embed_pairs' result: the two views' embeddings z1, z2 (B, E) and the batch's non-pad tokens
Embedded = namedtuple("Embedded", "z1 z2 tokens")


def embed_pairs(model, batch, device=None):
    """batch: the loader's CPU tensors (ids (B, 2, L), eos (B, 2)) -> Embedded. Cut and counted on the
    host (.numpy() refuses a device tensor), then moved to `device`: nothing here waits for the GPU."""
    ids, eos = batch
    B = ids.shape[0]
    # causal: nothing after the batch's last <E> can change an output we read, so drop it;
    # rounded up to a multiple of 64 to keep the number of shapes (compile) small
    ids = ids[..., :min(ids.shape[-1], -(-(eos.numpy().max() + 1) // 64) * 64)].reshape(2 * B, -1)
    n = int((ids.numpy() != T.PAD_ID).sum())
    ids, eos = (x.to(device, non_blocking=True) for x in (ids, eos)) if device else (ids, eos)
    z = model(ids, out_pos=eos.reshape(2 * B)).view(B, 2, -1)  # row 2b + v: file b, view v
    return Embedded(z[:, 0], z[:, 1], n)


def contrastive_loss(model, batch, autocast=contextlib.nullcontext(), loss="ntxent", temperature=0.1,
                     distributed=False, device=None):
    """One micro-batch's loss -> (loss, non-pad tokens); batch as embed_pairs'. The model runs under
    `autocast` (bf16 on CUDA); the embeddings are then taken to float32 and the similarities,
    softmax and loss are computed outside autocast, where a matmul stays float32."""
    with autocast:
        emb = embed_pairs(model, batch, device)
    return pair_loss(emb.z1.float(), emb.z2.float(), loss, temperature, distributed), emb.tokens


# -----------------------------------------------------------------------------


def build_model(args):
    torch.manual_seed(args.seed)  # the fresh emb_head (and everything with --init none)
    overrides = dict(emb_size=args.emb_size)
    if args.resume:  # architecture from our own checkpoint; the loop loads its weights
        return M.load_model(Path(args.out) / "ckpt.pt", heads=("emb",), **overrides).train()
    if str(args.init).lower() == "none":
        cfg = M.PRESETS[args.preset]
        cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, args.max_len), **overrides)
        return M.Aria(cfg, ("emb",)).train()
    model = M.load_model(args.init, heads=("emb",), **overrides).train()
    if args.max_len > model.config.max_seq_len:
        raise Fail(f"--max_len {args.max_len} exceeds the model's context ({model.config.max_seq_len})")
    return model


def main():
    try:
        train(get_args())
    except (Fail, M.CheckpointError) as e:
        sys.exit(f"finetune_contrastive.py: {e}")


def train(args):
    if not 1 <= args.min_notes <= args.max_notes:
        raise Fail(f"--min_notes {args.min_notes} / --max_notes {args.max_notes}: need 1 <= min <= max")
    if args.max_len < 16:
        raise Fail(f"--max_len {args.max_len} is too short")
    if args.temperature <= 0:
        raise Fail(f"--temperature must be positive, not {args.temperature}")
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        raise Fail(f"{data} is not a dataset (no meta.json): run prepare.py first")
    if M.data_vocab(data) != T.VOCAB_SIZE:  # views are re-cut from the tokens, which drops pedal events
        raise Fail(f"{data} holds pedal tokens (prepare.py --pedal): contrastive finetuning reads the "
                   "default vocabulary, as the official embedding model does; "
                   "prepare the data without --pedal")
    # no TF32: the embedding head and the similarities must stay float32 (near-identical embeddings, below)
    proc = TR.setup_distributed(args.device, tf32=False)
    rank, world = proc.rank, proc.world
    device = proc.device
    master, out = rank == 0, Path(args.out)
    amp = TR.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    model = build_model(args).to(device)
    M.data_vocab(data, model)  # a pedal --init with this default-vocabulary data: one line
    # the micro-batch is the loss's batch (its negatives): only activation checkpointing is planned
    # -> (micro, checkpointing, bytes, a line saying so)
    planned = TR.plan_batch(model.config, args.max_len, 2 * args.batch_size, device, 2 * args.batch_size,
                           args.grad_checkpoint, amp is not None, lm_head=False)
    model.config.grad_checkpoint = planned.grad_ckpt
    plan = planned.line

    per_step = args.batch_size * args.grad_accum * world
    train_set = ViewPairs(data, "train", per_step, args.seed, args.max_len, args.min_notes, args.max_notes,
                          args.augment)
    if train_set.n < args.batch_size * world:
        raise Fail(f"{data}: {train_set.n} training files, fewer than a batch of {args.batch_size * world} "
                   "(a file may not be its own negative): lower --batch_size")
    spe = train_set.steps_per_epoch
    if args.max_iters is None:
        args.max_iters = max(1, round(args.epochs * spe))
    if args.warmup is None:
        args.warmup = min(1000, args.max_iters // 10)
    else:
        args.warmup = min(args.warmup, args.max_iters)
    if args.eval_interval is None:
        args.eval_interval = spe
    args.ckpt_interval = args.ckpt_interval or spe
    val_set = None
    if (data / "val.idx.npy").is_file():
        val_set = ViewPairs(data, "val", 1, args.seed, args.max_len, args.min_notes, args.max_notes, False)
    n_val = min(val_set.n, args.eval_files) if val_set else 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"finetune_contrastive: init {args.init} ({model.num_params() / 1e6:.1f}M params, "
              f"emb {model.config.emb_size}) on {device}, world {world}, "
              f"{'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}; "
              f"{train_set.n} files, {spe} steps per epoch; "
              f"{args.max_iters} steps ({args.max_iters / spe:.2f} epochs) "
              f"of {per_step} pairs; loss {args.loss}, t={args.temperature}, warmup {args.warmup}, "
              f"augment {'on' if args.augment else 'off'}; views per process: {plan}", flush=True)

    # optimizer; --resume restores weights, optimizer moments, step and RNG (data order needs only the step)
    opt = TR.configure_optimizer(model, args.lr, args.weight_decay, device_type=device.type)
    step = 0
    if args.resume:
        ckpt = M.load_checkpoint(out / "ckpt.pt")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        if master:
            print(f"resuming from {out / 'ckpt.pt'} at step {step}")
    raw, ddp = model, None  # what we save and evaluate: `raw`; compile wraps DDP (pretrain.py says why)
    if torch.distributed.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        model = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if device.type == "cuda" and args.compile:
        model = torch.compile(model)

    @torch.no_grad()
    def evaluate():
        """val_loss over batches of the global batch size, and val_top1: how often a view's nearest
        (cosine) among the other views of the n_val files is its partner, both directions."""
        raw.eval()
        zs, bs = [], args.batch_size * world
        for i in range(0, n_val, bs):
            batch = [val_set[g] for g in range(i, min(i + bs, n_val))]
            ids = torch.stack([b[0] for b in batch])
            eos = torch.stack([b[1] for b in batch])
            with autocast:
                emb = embed_pairs(raw, (ids, eos), device)
            zs.append((emb.z1.float(), emb.z2.float()))
        raw.train()
        full = [(z1, z2) for z1, z2 in zs if len(z1) >= 2]
        val_loss = sum(LOSSES[args.loss](z1, z2, args.temperature).item() * len(z1) for z1, z2 in full)
        z1 = F.normalize(torch.cat([z[0] for z in zs]), dim=-1)
        z2 = F.normalize(torch.cat([z[1] for z in zs]), dim=-1)
        s = z1 @ z2.T  # float32: outside autocast
        hit = torch.arange(len(s), device=s.device)
        top1 = ((s.argmax(1) == hit).float().mean() + (s.argmax(0) == hit).float().mean()) / 2
        return {"val_loss": round(val_loss / sum(len(z1) for z1, _ in full), 6),
                "val_top1": round(top1.item(), 4)}

    def save():
        if master:
            rng_cuda = {"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
            M.save_checkpoint(out / "ckpt.pt", raw, optimizer=opt.state_dict(), step=step, args=vars(args),
                              rng_cpu=torch.get_rng_state(), **rng_cuda)
        if world > 1:
            torch.distributed.barrier()

    def log(rec):  # one line on stdout, one JSON record in OUT/log.jsonl
        if master:
            print(" | ".join(LOG_FORMAT.get(k, k + " {}").format(v) for k, v in rec.items()), flush=True)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def sync():  # CUDA runs ahead of Python: wait for it before reading a clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # the loader yields this rank's micro-batches from `step` on (TR.StepSampler); its own
    # generator, so that starting it does not draw from the restored global RNG
    sampler = TR.StepSampler(step, args.batch_size, args.grad_accum, rank, world)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    stop = min(args.max_iters, args.stop_at or args.max_iters)
    first = step
    # rates count training only: the clock is stopped for evaluation and checkpoints, and the
    # first step of a job (compilation, loader start-up) is reported on its own
    t_mark, busy = time.time(), 0.0
    n_steps, n_tokens = 0, 0
    model.train()
    while step < stop:
        lr = TR.lr_at(step, args.lr, args.warmup, args.max_iters, args.final_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        try:
            for micro in range(args.grad_accum):
                if ddp is not None:  # under torchrun: all-reduce gradients in the last micro-step's backward
                    ddp.require_backward_grad_sync = micro == args.grad_accum - 1
                # CPU (ids, eos) in; negatives gathered from every process; the loss in float32, outside
                # autocast
                loss, n = contrastive_loss(model, next(batches), autocast, args.loss, args.temperature,
                                           world > 1, device)
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach() / args.grad_accum
                n_tokens += n  # this process's: tokens/s and MFU are per process (per GPU)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
            opt.step()
        except torch.cuda.OutOfMemoryError:
            raise Fail(f"out of GPU memory with {2 * args.batch_size} views of up to {args.max_len} tokens "
                       f"and activation checkpointing {'on' if raw.config.grad_checkpoint else 'off'}: "
                       "set --grad_checkpoint 1, or lower --batch_size (fewer negatives) or --max_len"
                       ) from None
        opt.zero_grad(set_to_none=True)
        step += 1
        n_steps += 1

        if step == first + 1 and step < stop:
            sync()
            if master:
                print(f"first step took {time.time() - t_mark:.1f} s (compilation, loader start-up); "
                      "not in the rates")
            t_mark, busy = time.time(), 0.0
            n_steps, n_tokens = 0, 0
        if step % args.log_interval == 0 or step == stop:
            loss = loss_sum.item()  # the same on every rank (a loss of the gathered global batch)
            busy += time.time() - t_mark
            rec = {"step": step, "loss": round(loss, 6), "lr": float(f"{lr:.3e}")}
            if n_steps:  # tokens: the views' non-pad tokens
                mfu = TR.estimate_mfu(raw.config, args.max_len, n_tokens / busy, lm_head=False,
                                     peak=args.peak_tflops * 1e12) \
                    if device.type == "cuda" or args.peak_tflops else None
                rec.update(ms=round(1e3 * busy / n_steps, 1), tok_s=round(n_tokens / busy),
                           **({"mfu": round(mfu, 4)} if mfu else {}),
                           eta_s=round((stop - step) * busy / n_steps))
            log(rec)
            t_mark, busy = time.time(), 0.0
            n_steps, n_tokens = 0, 0
        evaluating = args.eval_interval and step % args.eval_interval == 0 or step == stop
        saving = args.ckpt_interval and step % args.ckpt_interval == 0 or step == stop
        if evaluating or saving:
            sync()
            busy += time.time() - t_mark
            if evaluating and n_val >= 2:
                log({"step": step, **evaluate()})
            if saving:
                save()
            t_mark = time.time()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
