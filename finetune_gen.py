"""
The generative finetune (paper §3.2 "Generative finetuning"; the recipe behind aria-medium-gen):
one epoch on higher-quality data, the learning rate annealed to zero, every training sequence
starting at the beginning of a file (not packed) and <D> placed about 100 tokens before each
file's end, so that at inference `sample.py --end` can steer a continuation toward an ending.

    python prepare.py ~/best_midi --strict --out data/gen     # tighter filters, no synthesized MIDI
    python finetune_gen.py --init out/pretrain --data data/gen --out out/gen
    python finetune_gen.py --init aria-medium-base/model.safetensors --data data/gen --out out/gen
    python sample.py prompt.mid --ckpt out/gen --end

A file longer than the context gives several sequences (as official `--sep_sequences`, SPEC §C.1):
the first starts at the file's start and the last ends at the file's end, overlapping its
predecessor so that <D> and <E> always share an example (officially the end can be split from
its <D>); short files are right-padded with <P>, which the loss ignores. <D> is re-drawn every epoch with the official
rule (SPEC §A.6), as the official code re-tokenizes each epoch. The loop is model.train, shared
with pretrain.py.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

import model as M
import tokenizer as T


# defaults: paper §3.2 "Generative finetuning"; what the paper leaves open comes from the
# official train.py, which this stage reuses (SPEC §C.2)
DEFAULTS = dict(
    out="out/gen",
    batch_size=16,        # as pretraining (paper §4.1)
    grad_accum=1,
    lr=3e-4,              # the paper gives none; official get_optim (SPEC §C.2)
    warmup=200,           # official get_optim (SPEC §C.2)
    final_lr_frac=0.0,    # paper §3.2: annealed to zero
    weight_decay=0.1,     # SPEC §C.2
    grad_clip=0.0,        # off, as official
    epochs=1,             # paper §3.2: a single epoch
    max_iters=None,
    stop_at=None,
    eval_interval=0,
    log_interval=10,
    ckpt_interval=500,
    workers=2,
    compile=1,
    device="auto",
    seed=0,
)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Aria generative finetune (<D> ending control).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init", required=False, help="pretrained checkpoint: a file (official .safetensors or ours) or an output folder")
    ap.add_argument("--data", required=False, help="dataset folder written by prepare.py (--strict recommended)")
    ap.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the model's context, 8192 for medium)")
    ap.add_argument("--no_augment", dest="augment", action="store_false", help="turn off online augmentation (on, as the official train.py)")
    ap.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    M.add_train_args(ap, **DEFAULTS)
    args = ap.parse_args(argv)
    args = M.resume_args(args, ap, args.out)
    if not args.init or not args.data:
        ap.error("--init and --data are required (unless --resume)")
    return args


# -----------------------------------------------------------------------------
# data: file-start sequences with <D> re-placed every epoch

def place_dim(ids, rng):
    """ids of one file (with <E>) -> the same with <D> re-placed by the official rule (SPEC §A.6)."""
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
        self.bin, self.seq_len, self.seed, self.augment = Path(folder) / f"{split}.bin", seq_len, seed, augment
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


# -----------------------------------------------------------------------------

def main():
    try:
        args = get_args()
        rank, world, device = M.setup_distributed(args.device)
        model = M.load_model(args.init, heads=("lm",), grad_checkpoint=args.grad_checkpoint).train()
    except M.CheckpointError as e:
        sys.exit(f"finetune_gen.py: {e}")
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        sys.exit(f"finetune_gen.py: {data} is not a dataset (no meta.json): run prepare.py first")
    if M.json.loads((data / "meta.json").read_text())["vocab_hash"] != T.VOCAB_HASH:
        sys.exit(f"finetune_gen.py: {data} was tokenized with another vocabulary")

    args.seq_len = args.seq_len or model.config.max_seq_len
    if args.seq_len > model.config.max_seq_len:
        sys.exit(f"finetune_gen.py: --seq_len {args.seq_len} exceeds the model's context {model.config.max_seq_len}")
    torch.manual_seed(args.seed)
    train_set = FileSequences(data, "train", args.seq_len, args.seed, args.augment)
    val_set = FileSequences(data, "val", args.seq_len, args.seed, False)
    per_step = args.batch_size * args.grad_accum * world
    if args.max_iters is None:
        args.max_iters = max(1, int(args.epochs * len(train_set) / per_step))
    args.warmup = min(args.warmup, args.max_iters)
    if rank == 0:
        print(f"finetune_gen: {args.init} ({model.num_params() / 1e6:.1f}M params) on {device}, world {world}; "
              f"{len(train_set)} file-start sequences of {args.seq_len}; {args.max_iters} steps of {per_step}")

    def evaluate(m):
        n = min(len(val_set), args.eval_iters * args.batch_size)
        if n == 0:
            return {}
        batches = [torch.stack([torch.from_numpy(val_set.sequence(g, False)) for g in range(i, min(i + args.batch_size, n))])
                   for i in range(0, n, args.batch_size)]
        return {"val_loss": torch.stack([M.next_token_loss(m, b.to(device))[0] for b in batches]).mean().item()}

    M.train(model, args, train_set, M.next_token_loss, evaluate, tokens_per_micro=args.batch_size * args.seq_len,
            rank=rank, world=world, device=device, seq_len=args.seq_len)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
