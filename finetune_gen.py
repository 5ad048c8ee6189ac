"""
The generative finetune (paper §3.2 "Generative finetuning"; the recipe behind aria-medium-gen):
one epoch on higher-quality data, the learning rate annealed to zero, every training sequence
starting at the beginning of a file (not packed) and <D> placed about 100 tokens before each
file's end, so that at inference `sample.py --end` can steer a continuation toward an ending.
"Official" below is EleutherAI/aria @ b0486c8 and EleutherAI/aria-utils @ e122d03.

    python prepare.py ~/best_midi --strict --out data/gen     # tighter filters, no synthesized MIDI
    python finetune_gen.py --init out/pretrain --data data/gen --out out/gen
    python finetune_gen.py --init aria-medium-base/model.safetensors --data data/gen --out out/gen
    python sample.py prompt.mid --ckpt out/gen --end

A file longer than the context gives several sequences (as the official `--sep_sequences`,
aria/datasets.py PretrainingDataset.build): the first starts at the file's start and the last ends
at the file's end, overlapping its predecessor so that <D> and <E> always share an example
(officially the end can be split from its <D>); short files are right-padded with <P>, which the
loss ignores. <D> is re-drawn every epoch with the official rule (ariautils/tokenizer/absolute.py,
AbsTokenizer._format), as the official code re-tokenizes each epoch. The training loop is
pretrain.py's (micro-batches planned from the GPU's memory, bf16 autocast on CUDA, chunked float32
loss, DDP, exact --resume), written out here too.
"""
import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import model as M
import tokenizer as T
import training as TR

# how log records print on stdout (OUT/log.jsonl has them as JSON)
LOG_FORMAT = {"loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.2e}", "ms": "{:.0f} ms/step",
              "tok_s": "{:,} tok/s per process", "mfu": "MFU {:.1%}", "eta_s": "ETA {}s"}


def get_args(argv=None):
    # defaults: paper §3.2 "Generative finetuning"; what the paper leaves open comes from the
    # official aria/training/train.py, which this stage reuses
    ap = argparse.ArgumentParser(description="Aria generative finetune (<D> ending control).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init",
                    help="pretrained checkpoint: a file (official .safetensors or ours) or an output folder")
    ap.add_argument("--data", help="dataset folder written by prepare.py (--strict recommended)")
    ap.add_argument("--out", default="out/gen", help="checkpoint (ckpt.pt) and log.jsonl go here")
    ap.add_argument("--seq_len", type=int, default=None,
                    help="tokens per sequence (default: the model's context, 8192 for medium)")
    ap.add_argument("--batch_size", type=int, default=16,
                    help="sequences per process per optimizer step (as pretraining, paper §4.1)")
    ap.add_argument("--micro_batch", type=int, default=0,
                    help="sequences per forward/backward (0: the most that fit the GPU's memory; all on CPU)")
    ap.add_argument("--lr", type=float, default=3e-4,
                    help="peak learning rate (the paper gives none; official aria/training/train.py, "
                    "get_optim)")
    ap.add_argument("--warmup", type=int, default=200,
                    help="linear warmup steps (official aria/training/train.py, get_optim)")
    ap.add_argument("--final_lr_frac", type=float, default=0.0,
                    help="then linear decay to this fraction of lr (paper §3.2: annealed to zero)")
    ap.add_argument("--weight_decay", type=float, default=0.1,
                    help="AdamW, on all parameters; betas (0.9, 0.95), eps 1e-5 (official "
                    "aria/training/train.py, get_optim)")
    ap.add_argument("--grad_clip", type=float, default=0.0,
                    help="clip the gradient norm (0: off, as the official code)")
    ap.add_argument("--epochs", type=float, default=1,
                    help="passes over the data (paper §3.2: a single epoch); sets max_iters")
    ap.add_argument("--max_iters", type=int, default=None, help="optimizer steps (default: from --epochs)")
    ap.add_argument("--stop_at", type=int, default=None,
                    help="stop after this step without ending the schedule (split a run into jobs)")
    ap.add_argument("--no_augment", dest="augment", action="store_false",
                    help="turn off online augmentation (on, as the official train.py)")
    ap.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                    help="recompute each block's activations in backward (auto: only if no micro-batch fits "
                    "without)")
    ap.add_argument("--eval_interval", type=int, default=0,
                    help="steps between validation losses (0: only at the end)")
    ap.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    ap.add_argument("--log_interval", type=int, default=10, help="steps per log line")
    ap.add_argument("--ckpt_interval", type=int, default=500,
                    help="steps between checkpoints (and one at the end)")
    ap.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype of the forward/backward; auto: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model on CUDA (1/0)")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense bf16 TFLOP/s for MFU (0: from the GPU's name)")
    ap.add_argument("--seed", type=int, default=0, help="data order, <D> placement and augmentation")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    argv = sys.argv[1:] if argv is None else argv
    args = TR.resume_args(ap.parse_args(argv), ap, argv)
    if not args.init or not args.data:
        ap.error("--init and --data are required (unless --resume)")
    return args


# -----------------------------------------------------------------------------
# data: file-start sequences with <D> re-placed every epoch

def place_dim(ids, rng):
    """ids of one file (with <E>) -> the same with <D> re-placed by the official AbsTokenizer._format."""
    ids = [i for i in ids if i != T.DIM_ID]
    if T.BOS_ID not in ids or ids[-1] != T.EOS_ID:
        return ids
    s = ids.index(T.BOS_ID) + 1
    body = ids[s:-1]
    offset = -100 + rng.randint(-10, 10)
    if len(body) > 150:
        T.insert_dim(body, offset)
    return ids[:s] + body + [T.EOS_ID]


class FileSequences(torch.utils.data.Dataset):
    """Sample g -> sequence perm[g % n] of epoch g // n, where the n sequences are (file, k):
    tokens [k*T, k*T + T + 1) of that file, <P>-padded; augmented with a generator seeded by g."""

    def __init__(self, folder, split, seq_len, seed, augment):
        self.bin, self.seq_len = Path(folder) / f"{split}.bin", seq_len
        self.seed, self.augment = seed, augment
        idx = np.load(Path(folder) / f"{split}.idx.npy")
        self.offsets = idx
        lengths = np.diff(idx)
        per_file = np.maximum(1, -(-(lengths - 1) // seq_len))  # sequences per file
        self.items = [(f, k) for f, n in enumerate(per_file) for k in range(int(n))]
        self.per_file = per_file
        self.tokens, self.perms = None, {}

    def __len__(self):
        return len(self.items)

    def sequence(self, g, augment):
        if self.tokens is None:
            self.tokens = np.memmap(self.bin, dtype=np.uint16, mode="r")
        epoch, i = divmod(g, len(self.items))
        if epoch not in self.perms:
            self.perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.items))}
        f, k = self.items[self.perms[epoch][i]]
        ids = self.tokens[self.offsets[f]:self.offsets[f + 1]].tolist()
        ids = place_dim(ids, random.Random(f"{self.seed}:{epoch}:{f}"))
        # the last sequence ends at the file's end (overlapping its predecessor), so <D> and <E>
        # are always seen together
        start = k * self.seq_len if k < self.per_file[f] - 1 else max(0, len(ids) - self.seq_len - 1)
        x = np.asarray(ids[start:start + self.seq_len + 1], dtype=np.int64)
        if augment:
            x = T.augment(x, random.Random(f"{self.seed}:{g}"))
        return T.fit_length(x, self.seq_len + 1)

    def __getitem__(self, g):
        return torch.from_numpy(self.sequence(g, self.augment))


def next_token_loss(model, batch, autocast=contextlib.nullcontext()):
    """batch (B, T+1) ids -> mean next-token cross-entropy, <P> targets ignored. The forward runs
    under `autocast` (bf16 on CUDA); the loss is float32, outside it, chunked (model.LMLoss)."""
    with autocast:
        return TR.LMLoss(model)(batch)


# -----------------------------------------------------------------------------

def main():
    try:
        args = get_args()
        proc = TR.setup_distributed(args.device)
        rank, world = proc.rank, proc.world
        device = proc.device
        model = M.load_model(args.init, heads=("lm",)).to(device).train()
    except M.CheckpointError as e:
        sys.exit(f"finetune_gen.py: {e}")
    master, out = rank == 0, Path(args.out)
    amp = TR.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        sys.exit(f"finetune_gen.py: {data} is not a dataset (no meta.json): run prepare.py first")
    try:  # the dataset's vocabulary must be the model's (prepare.py --pedal for a pedal model)
        M.data_vocab(data, model)
    except M.CheckpointError as e:
        sys.exit(f"finetune_gen.py: {e}")
    args.seq_len = args.seq_len or model.config.max_seq_len
    if args.seq_len > model.config.max_seq_len:
        sys.exit(f"finetune_gen.py: --seq_len {args.seq_len} exceeds the model's context "
                 f"{model.config.max_seq_len}")
    planned = TR.plan_batch(model.config, args.seq_len, args.batch_size, device, args.micro_batch,
                           args.grad_checkpoint, amp is not None)  # (micro, checkpointing, bytes, line)
    micro, model.config.grad_checkpoint = planned.micro, planned.grad_ckpt
    plan = planned.line
    accum = args.batch_size // micro
    torch.manual_seed(args.seed)
    train_set = FileSequences(data, "train", args.seq_len, args.seed, args.augment)
    val_set = FileSequences(data, "val", args.seq_len, args.seed, False)
    per_step = args.batch_size * world
    if args.max_iters is None:
        args.max_iters = max(1, int(args.epochs * len(train_set) / per_step))
    args.warmup = min(args.warmup, args.max_iters)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"finetune_gen: {args.init} ({model.num_params() / 1e6:.1f}M params) on {device}, "
              f"world {world}, {'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}; "
              f"{len(train_set)} file-start sequences of {args.seq_len}; "
              f"{args.max_iters} steps of {per_step}; per process {plan}")

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
    # what we save and evaluate: `raw`. The loop runs the whole loss as one module, under torchrun in
    # DDP, compiled around DDP so that the gradients' all-reduce overlaps the backward (as pretrain.py)
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
        batches = [torch.stack([torch.from_numpy(val_set.sequence(g, False))
                                for g in range(i, min(i + micro, n))])
                   for i in range(0, n, micro)]
        # weighted by non-<P> targets: the mean over tokens, whatever micro-batches the GPU allows
        losses = [(next_token_loss(raw, b.to(device), autocast), int((b[:, 1:] != T.PAD_ID).sum()))
                  for b in batches]
        raw.train()
        return (sum(loss * k for loss, k in losses) / sum(k for _, k in losses)).item() if losses else None

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
            sys.exit(f"finetune_gen.py: out of GPU memory with micro-batches of {micro} x {args.seq_len} and "
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
