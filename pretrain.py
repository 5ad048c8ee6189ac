"""
Next-token pretraining of Aria on a prepared dataset (paper §3.2 "Pretraining recipe", §4.1).
"Official" below is EleutherAI/aria @ b0486c8 (aria/training/train.py) with aria-utils @ e122d03.

    python pretrain.py                                 # quick start: tiny model, synthetic piano, CPU minutes
    python pretrain.py --data data/mine --preset small --out out/small
    torchrun --nproc_per_node=8 pretrain.py --data data/mine --preset medium --out out/medium
    python pretrain.py --out out/small --resume        # continue exactly where it stopped

Sequences are windows of the concatenated token stream of all training files (packed across
file boundaries, no document mask, as the official code), reshuffled every epoch, each
augmented on the fly in loader workers (pitch ±5, tempo ±20%, velocity ±10). Which window a
step sees is a function of (seed, step) only, so --resume needs no loader state and the same
global batch is seen whatever the number of processes.

One optimizer step = --batch_size sequences on every process (the paper's 16 per GPU), run as
micro-batches of --micro_batch with activation checkpointing if needed, both chosen from the GPU's
memory at start (model.plan_batch) and printed. The model runs under bf16 autocast on CUDA
(--dtype); the loss is float32 cross-entropy outside autocast, chunked so that the (B, T, V)
float32 logits never exist (model.LMLoss). DDP averages the gradients once per step, in the backward
of the last micro-step. OUT/ckpt.pt (atomic) holds model, optimizer, step, RNG and settings: --resume
restores all of it.
"""
import argparse
import contextlib
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import model as M
import tokenizer as T
import training as TR

# python pretrain.py with no arguments: a few minutes on a laptop CPU. The tiny model trains
# stably at 1e-3, which gets a demo this short much further than the paper's 3e-4 for medium.
QUICKSTART_FILES = 400  # generated pieces (prepare.py --synthetic), about 1.6M tokens
QUICKSTART = dict(data="data/synthetic", preset="tiny", seq_len=256, batch_size=8, max_iters=300, warmup=30,
                  lr=1e-3, eval_interval=100, eval_iters=8, log_interval=20, ckpt_interval=100)


# how log records print on stdout (OUT/log.jsonl has them as JSON)
LOG_FORMAT = {"loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.2e}", "ms": "{:.0f} ms/step",
              "tok_s": "{:,} tok/s per process", "mfu": "MFU {:.1%}", "eta_s": "ETA {}s"}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Aria next-token pretraining.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="data/synthetic", help="dataset folder written by prepare.py")
    ap.add_argument("--out", default="out/pretrain", help="checkpoint (ckpt.pt) and log.jsonl go here")
    ap.add_argument("--preset", default="tiny", choices=list(M.PRESETS), help="model size (paper: medium)")
    ap.add_argument("--seq_len", type=int, default=None,
                    help="tokens per sequence (default: the preset's context; 8192 for medium, paper §3.2)")
    ap.add_argument("--batch_size", type=int, default=16,
                    help="sequences per process per optimizer step (paper §4.1: 16 per GPU)")
    ap.add_argument("--micro_batch", type=int, default=0,
                    help="sequences per forward/backward (0: the most that fit the GPU's memory; all on CPU)")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (paper §4.1)")
    ap.add_argument("--warmup", type=int, default=1000, help="linear warmup steps (paper §4.1)")
    ap.add_argument("--final_lr_frac", type=float, default=0.1,
                    help="then linear decay to this fraction of lr (paper §4.1)")
    ap.add_argument("--weight_decay", type=float, default=0.1,
                    help="AdamW, on all parameters; betas (0.9, 0.95), eps 1e-5 (official "
                    "aria/training/train.py, get_optim; the paper does not say)")
    ap.add_argument("--grad_clip", type=float, default=0.0,
                    help="clip the gradient norm (0: off, as the official code)")
    ap.add_argument("--epochs", type=float, default=75,
                    help="passes over the training data (paper §4.1); sets max_iters")
    ap.add_argument("--max_iters", type=int, default=None, help="optimizer steps (default: from --epochs)")
    ap.add_argument("--stop_at", type=int, default=None,
                    help="stop after this step without ending the schedule (split a run into jobs)")
    ap.add_argument("--no_augment", dest="augment", action="store_false",
                    help="turn off online augmentation (paper §3.2)")
    ap.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                    help="recompute each block's activations in backward (auto: only if no micro-batch fits "
                    "without)")
    ap.add_argument("--eval_interval", type=int, default=500,
                    help="steps between validation losses (0: only at the end)")
    ap.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    ap.add_argument("--log_interval", type=int, default=10, help="steps per log line")
    ap.add_argument("--ckpt_interval", type=int, default=1000,
                    help="steps between checkpoints (and one at the end)")
    ap.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype of the forward/backward; auto: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model on CUDA (1/0)")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense bf16 TFLOP/s for MFU (0: from the GPU's name)")
    ap.add_argument("--seed", type=int, default=0, help="model init, data order and augmentation")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        ap.set_defaults(**QUICKSTART)
    args = ap.parse_args(argv)
    return TR.resume_args(args, ap, argv)


# -----------------------------------------------------------------------------
# data

class PackedWindows(torch.utils.data.Dataset):
    """Sample g -> a window of seq_len+1 tokens of split.bin: epoch g // n, window perm[g % n],
    windows start at a random per-epoch offset; augmented with a generator seeded by (seed, g)."""

    def __init__(self, folder, split, seq_len, seed, augment):
        self.path, self.seq_len = Path(folder) / f"{split}.bin", seq_len
        self.seed, self.augment = seed, augment
        self.n = max(0, (self.path.stat().st_size // 2 - 1 - seq_len) // seq_len)
        self.tokens, self.perms = None, {}

    def __len__(self):
        return self.n

    def window(self, g):
        if self.tokens is None:  # opened lazily: one memmap per worker process
            self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        epoch, i = divmod(g, self.n)
        if epoch not in self.perms:
            rng = np.random.default_rng([self.seed, epoch])
            self.perms = {epoch: (rng.integers(self.seq_len), rng.permutation(self.n))}
        offset, perm = self.perms[epoch]
        start = offset + perm[i] * self.seq_len
        return self.tokens[start:start + self.seq_len + 1].astype(np.int64)

    def __getitem__(self, g):
        x = self.window(g)
        if self.augment:
            x = T.augment(x, random.Random(f"{self.seed}:{g}"))
        return torch.from_numpy(x)


def load_data(args, rank, world):
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        if args.data != QUICKSTART["data"]:
            sys.exit(f"pretrain.py: {data} is not a dataset (no meta.json): run prepare.py first")
        if rank == 0:  # the quick start makes its own corpus
            subprocess.run([sys.executable, str(Path(__file__).with_name("prepare.py")),
                            "--synthetic", str(QUICKSTART_FILES), "--out", str(data)], check=True)
        if world > 1:
            torch.distributed.barrier()
    train_set = PackedWindows(data, "train", args.seq_len, args.seed, args.augment)
    if len(train_set) == 0:
        sys.exit(f"pretrain.py: {data} has fewer than {2 * args.seq_len + 1} training tokens "
                 f"for --seq_len {args.seq_len}")
    return train_set, PackedWindows(data, "val", args.seq_len, args.seed, False)


def next_token_loss(model, batch, autocast=contextlib.nullcontext()):
    """batch (B, T+1) ids -> mean next-token cross-entropy, <P> targets ignored. The forward runs
    under `autocast` (bf16 on CUDA); the loss is float32, outside it, chunked (model.LMLoss)."""
    with autocast:
        return TR.LMLoss(model)(batch)


# -----------------------------------------------------------------------------

def main():
    try:
        args = get_args()
    except M.CheckpointError as e:
        sys.exit(f"pretrain.py: {e}")
    proc = TR.setup_distributed(args.device)
    rank, world = proc.rank, proc.world
    device = proc.device
    master, out = rank == 0, Path(args.out)
    amp = TR.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    # model: the preset, widened to --seq_len if that is longer than its context; micro-batches
    # and activation checkpointing from the device's memory (model.plan_batch, printed below)
    torch.manual_seed(args.seed)
    cfg = M.PRESETS[args.preset]
    args.seq_len = args.seq_len or cfg.max_seq_len
    train_set, val_set = load_data(args, rank, world)
    try:  # the dataset's vocabulary: 17,727 ids, or 17,729 from prepare.py --pedal
        vocab = M.data_vocab(args.data)
    except M.CheckpointError as e:
        sys.exit(f"pretrain.py: {e}")
    model = M.Aria(replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len), vocab_size=vocab)).to(device)
    planned = TR.plan_batch(model.config, args.seq_len, args.batch_size, device, args.micro_batch,
                           args.grad_checkpoint, amp is not None)  # (micro, checkpointing, bytes, line)
    micro, model.config.grad_checkpoint = planned.micro, planned.grad_ckpt
    plan = planned.line
    accum = args.batch_size // micro
    per_step = args.batch_size * world
    if args.max_iters is None:
        args.max_iters = max(1, int(args.epochs * len(train_set) / per_step))
    args.warmup = min(args.warmup, args.max_iters)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"pretrain: {args.preset} ({model.num_params() / 1e6:.1f}M params) on {device}, world {world}, "
              f"{'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}; "
              f"{len(train_set)} windows of {args.seq_len} tokens per epoch; "
              f"{args.max_iters} steps of {per_step} sequences "
              f"({args.max_iters * per_step / len(train_set):.2f} epochs); per process {plan}")

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
    # what we save and evaluate: `raw`, not wrapped. The loop runs the whole loss (head and chunked
    # cross-entropy) as one module: under torchrun DDP wraps it, then torch.compile wraps DDP, so that
    # compile splits the backward at DDP's buckets and their all-reduce overlaps the rest of backward
    raw, ddp = model, None
    model = TR.LMLoss(raw)
    if torch.distributed.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        model = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if device.type == "cuda" and args.compile:
        model = torch.compile(model)

    @torch.no_grad()
    def evaluate():
        raw.eval()
        n = min(len(val_set), args.eval_iters * args.batch_size)
        batches = [torch.stack([val_set[g] for g in range(i, min(i + micro, n))]) for i in range(0, n, micro)]
        losses = [next_token_loss(raw, b.to(device), autocast) for b in batches]
        raw.train()
        return torch.stack(losses).mean().item() if losses else None

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
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=TR.StepSampler(step, micro, accum, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    stop = min(args.max_iters, args.stop_at or args.max_iters)
    first = step
    # rates count training only: the clock is stopped for evaluation and checkpoints, and the
    # first step of a job (compilation, loader start-up) is reported on its own. Nothing in a step
    # waits for the device (no .item(), no int() of a device tensor): the log line does, once
    t_mark, busy = time.time(), 0.0
    n_steps = 0
    model.train()
    while step < stop:
        lr = TR.lr_at(step, args.lr, args.warmup, args.max_iters, args.final_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        try:
            for i in range(accum):
                batch = next(batches).to(device, non_blocking=True)
                if ddp is not None:  # under torchrun: all-reduce gradients in the last micro-step's backward
                    ddp.require_backward_grad_sync = i == accum - 1
                with autocast:
                    loss = model(batch)  # float32 (TR.LMLoss)
                (loss / accum).backward()
                loss_sum += loss.detach() / accum
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
            opt.step()
        except torch.cuda.OutOfMemoryError:
            sys.exit(f"pretrain.py: out of GPU memory with micro-batches of {micro} x {args.seq_len} and "
                     f"activation checkpointing {'on' if raw.config.grad_checkpoint else 'off'}: "
                     "lower --micro_batch or set --grad_checkpoint 1")
        opt.zero_grad(set_to_none=True)
        step += 1
        n_steps += 1

        if step == first + 1 and step < stop:
            sync()
            if master:
                print(f"first step took {time.time() - t_mark:.1f} s (compilation, loader start-up); "
                      "not in the rates")
            t_mark, busy = time.time(), 0.0
            n_steps = 0
        if step % args.log_interval == 0 or step == stop:
            if world > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss = loss_sum.item()  # waits for the device: the clock below is honest
            busy += time.time() - t_mark
            rec = {"step": step, "loss": round(loss, 6), "lr": float(f"{lr:.3e}")}
            if n_steps:  # tokens/s and MFU of one process (one GPU): its own share of the batch
                tok_s = n_steps * args.batch_size * args.seq_len / busy
                mfu = TR.estimate_mfu(raw.config, args.seq_len, tok_s, peak=args.peak_tflops * 1e12) \
                    if device.type == "cuda" or args.peak_tflops else None
                rec.update(ms=round(1e3 * busy / n_steps, 1), tok_s=round(tok_s),
                           **({"mfu": round(mfu, 4)} if mfu else {}))
                rec["eta_s"] = round((stop - step) * busy / n_steps)
            log(rec)
            t_mark, busy = time.time(), 0.0
            n_steps = 0
        evaluating = args.eval_interval and step % args.eval_interval == 0 or step == stop
        saving = args.ckpt_interval and step % args.ckpt_interval == 0 or step == stop
        if evaluating or saving:
            sync()
            busy += time.time() - t_mark
            if evaluating and (val := evaluate()) is not None:
                log({"step": step, "val_loss": round(val, 6)})
            if saving:
                save()
            t_mark = time.time()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
