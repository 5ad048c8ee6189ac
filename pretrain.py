"""
Next-token pretraining of Aria on a prepared dataset (paper §3.2 "Pretraining recipe", §4.1).

    python pretrain.py                                    # quick start: tiny model, synthetic piano, CPU minutes
    python pretrain.py --data data/mine --preset small --out out/small
    torchrun --nproc_per_node=8 pretrain.py --data data/mine --preset medium --out out/medium
    python pretrain.py --out out/small --resume           # continue exactly where it stopped

Sequences are windows of the concatenated token stream of all training files (packed across
file boundaries, no document mask, as the official code), reshuffled every epoch, each
augmented on the fly in loader workers (pitch ±5, tempo ±20%, velocity ±10). Which window a
step sees is a function of (seed, step) only, so --resume needs no loader state and the same
global batch is seen whatever the number of processes.
"""
import argparse
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import model as M
import tokenizer as T

# defaults: the paper's pretraining recipe (§3.2, §4.1) and the official optimizer (SPEC §C.2)
DEFAULTS = dict(
    out="out/pretrain",
    batch_size=16,        # paper §4.1: 16 sequences per GPU (8 GPUs)
    grad_accum=1,
    lr=3e-4,              # paper §4.1
    warmup=1000,          # paper §4.1
    final_lr_frac=0.1,    # paper §4.1: linear decay to 10% of the initial rate
    weight_decay=0.1,     # SPEC §C.2 (the paper does not say)
    grad_clip=0.0,        # off, as the official code (SPEC §C.2)
    epochs=75,            # paper §4.1
    max_iters=None,
    stop_at=None,
    eval_interval=500,
    log_interval=10,
    ckpt_interval=1000,
    workers=2,
    compile=1,
    device="auto",
    seed=0,
)
# python pretrain.py with no arguments: a few minutes on a laptop CPU. The tiny model trains
# stably at 1e-3, which gets a demo this short much further than the paper's 3e-4 for medium.
QUICKSTART = dict(data="data/synthetic", preset="tiny", seq_len=256, batch_size=8, max_iters=300, warmup=30,
                  lr=1e-3, eval_interval=100, eval_iters=8, log_interval=20, ckpt_interval=100)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Aria next-token pretraining.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="data/synthetic", help="dataset folder written by prepare.py")
    ap.add_argument("--preset", default="tiny", choices=list(M.PRESETS), help="model size")
    ap.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's context; 8192 for medium, paper §3.2)")
    ap.add_argument("--no_augment", dest="augment", action="store_false", help="turn off online augmentation (paper §3.2)")
    ap.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    M.add_train_args(ap, **DEFAULTS)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        ap.set_defaults(**QUICKSTART)
    args = ap.parse_args(argv)
    return M.resume_args(args, ap, args.out), ap


# -----------------------------------------------------------------------------
# data

class PackedWindows(torch.utils.data.Dataset):
    """Sample g -> a window of seq_len+1 tokens of split.bin: epoch g // n, window perm[g % n],
    windows start at a random per-epoch offset; augmented with a generator seeded by (seed, g)."""

    def __init__(self, folder, split, seq_len, seed, augment):
        self.path, self.seq_len, self.seed, self.augment = Path(folder) / f"{split}.bin", seq_len, seed, augment
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


# -----------------------------------------------------------------------------

def main():
    try:
        args, _ = get_args()
    except M.CheckpointError as e:
        sys.exit(f"pretrain.py: {e}")
    rank, world, device = M.setup_distributed(args.device)
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        if args.data == QUICKSTART["data"]:  # the quick start makes its own corpus
            if rank == 0:
                subprocess.run([sys.executable, str(Path(__file__).with_name("prepare.py")),
                                "--synthetic", "400", "--out", str(data)], check=True)
            if world > 1:
                torch.distributed.barrier()
        else:
            sys.exit(f"pretrain.py: {data} is not a dataset (no meta.json): run prepare.py first")
    meta = M.json.loads((data / "meta.json").read_text())
    if meta["vocab_hash"] != T.VOCAB_HASH:
        sys.exit(f"pretrain.py: {data} was tokenized with another vocabulary ({meta['vocab_hash']})")

    torch.manual_seed(args.seed)
    cfg = M.replace(M.PRESETS[args.preset], grad_checkpoint=args.grad_checkpoint)
    args.seq_len = args.seq_len or cfg.max_seq_len
    cfg = M.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    model = M.Aria(cfg)

    train_set = PackedWindows(data, "train", args.seq_len, args.seed, args.augment)
    val_set = PackedWindows(data, "val", args.seq_len, args.seed, False)
    if len(train_set) == 0:
        sys.exit(f"pretrain.py: {data} has fewer than {2 * args.seq_len + 1} training tokens for --seq_len {args.seq_len}")
    per_step = args.batch_size * args.grad_accum * world
    if args.max_iters is None:
        args.max_iters = max(1, int(args.epochs * len(train_set) / per_step))
    args.warmup = min(args.warmup, args.max_iters)
    if rank == 0:
        print(f"pretrain: {args.preset} ({model.num_params() / 1e6:.1f}M params) on {device}, world {world}; "
              f"{len(train_set)} windows of {args.seq_len} tokens per epoch; {args.max_iters} steps of "
              f"{per_step} sequences ({args.max_iters * per_step / len(train_set):.2f} epochs)")

    def evaluate(m):
        n = min(len(val_set), args.eval_iters * args.batch_size)
        if n == 0:
            return {}
        losses = [M.next_token_loss(m, torch.stack([val_set[g] for g in range(i, min(i + args.batch_size, n))]).to(device))[0]
                  for i in range(0, n, args.batch_size)]
        return {"val_loss": torch.stack(losses).mean().item()}

    M.train(model, args, train_set, M.next_token_loss, evaluate, tokens_per_micro=args.batch_size * args.seq_len,
            rank=rank, world=world, device=device, seq_len=args.seq_len)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
