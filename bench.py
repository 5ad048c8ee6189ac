"""
The performance figures that README reports, one subcommand per component.

    python bench.py tokenizer [FILES_OR_DIRS...]   # notes/s: mido parse vs our parse+tokenize, etc.
    python bench.py train --preset tiny --data data/synthetic   # a training step: tokens/s, MFU, peak memory; loader
    python bench.py sample --preset medium --cuda_graph          # ms/step, tokens/s, share of the bandwidth floor
    python bench.py sample [--preset tiny|small|medium] [--ckpt X] [--batch 1,8] [--tokens 256] [--compile]

Each prints a small table and the median over --repeats runs of the whole file set.
This is a benchmark, not a test: run it on a quiet machine.
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


def midi_files(paths, limit=None):
    files = []
    for p in map(Path, paths):
        files += sorted(x for x in p.rglob("*") if x.suffix.lower() in (".mid", ".midi")) if p.is_dir() else [p]
    return files[:limit] if limit else files


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tokenizer(args):
    import mido
    import tokenizer as T

    default = [SHARED / "aria" / "midi"] if not args.paths else args.paths
    files = midi_files(default, args.limit)
    if not files:
        sys.exit(f"bench.py: no MIDI files found in {' '.join(map(str, default))}")
    data = [f.read_bytes() for f in files]  # from memory: measure parsing, not the disk
    import io
    scores = [T.load_midi(d) for d in data]
    n_notes = sum(len(s.notes) for s in scores)
    ids = [T.tokenize(s) for s in scores]
    n_tokens = sum(map(len, ids))
    rng = random.Random(0)

    rows = [
        ("mido.MidiFile (parse only)", lambda: [mido.MidiFile(file=io.BytesIO(d)) for d in data]),
        ("load_midi (parse + pair notes)", lambda: [T.load_midi(d) for d in data]),
        ("tokenize (from a parsed Score)", lambda: [T.tokenize(s) for s in scores]),
        ("load_midi + tokenize", lambda: [T.tokenize(T.load_midi(d)) for d in data]),
        ("detokenize_notes", lambda: [T.detokenize_notes(x) for x in ids]),
        ("detokenize -> MidiFile", lambda: [T.detokenize(x) for x in ids]),
        ("augment (tempo+pitch+velocity)", lambda: [T.augment(x, rng) for x in ids]),
    ]
    print(f"tokenizer: {len(files)} files, {n_notes:,} notes, {n_tokens:,} tokens; median of {args.repeats}")
    print(f"{'stage':34s} {'ms':>9s} {'files/s':>9s} {'notes/s':>10s} {'× mido':>7s}")
    base = None
    for name, fn in rows:
        t = timed(fn, args.repeats)
        base = base or t
        print(f"{name:34s} {t * 1e3:9.1f} {len(files) / t:9.1f} {n_notes / t:10,.0f} {t / base:7.2f}")


def device_name(device):
    import platform
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def copy_bandwidth(device, nbytes):
    """Bytes/s of a device-to-device copy_ of nbytes (read + write counted; median of 5): the
    rate weights can stream at. On CPU a memcpy with torch's threads; one core may read alone
    faster than it copies, so a CPU share of the floor can pass 100%."""
    import torch
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    dst.copy_(src)
    sync()
    return 2 * nbytes / timed(lambda: (dst.copy_(src), sync()), 5)


def bench_sample(args):
    """sample.generate's decode step (grammar and min-p sampling included), random weights
    unless --ckpt, for each --batch: ms per step and new tokens/s after a warm-up run of the
    same shape, the time from the start of the first run (right after model loading) to its
    first new token, and the share of the bandwidth floor: reading every weight once per
    step at the measured copy bandwidth."""
    import torch
    import model as M
    import sample as S
    import tokenizer as T

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = S.pick_device(args.device)
        batches = [int(b) for b in args.batch.split(",")]
    except (S.Fail, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    dtype = S.pick_dtype(args.dtype, device)
    if args.ckpt:
        try:
            model = M.load_model(args.ckpt, device=device, dtype=dtype)
        except M.CheckpointError as e:
            sys.exit(f"bench.py: {e}")
        name = args.ckpt
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = M.Aria(M.PRESETS[args.preset])
        model = model.to(dtype).eval()
        name = f"{args.preset} (random weights)"
    gpu = device == "cuda"
    for option in ("compile", "cuda_graph"):
        if getattr(args, option) and not gpu:
            print(f"note: --{option} applies to CUDA only; decoding eagerly on {device}")
    modes = [name for name, on in (("torch.compile", args.compile), ("CUDA graph", args.cuda_graph)) if on and gpu]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, (1 << 30) if gpu else (256 << 20))
    floor = weight_bytes / bw
    print(f"sample: {name}, {model.num_params() / 1e6:.1f}M parameters ({weight_bytes / 1e6:.1f} MB "
          f"{str(dtype).replace('torch.', '')}), {device}: {device_name(device)}; {' + '.join(modes) or 'eager'}")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s ({'1 GiB' if gpu else '256 MiB'} copy_, read + write) -> "
          f"floor {floor * 1e3:.3f} ms/step (every weight read once per step)")
    print(f"{args.tokens} new tokens per row after a 2-token prompt")
    print(f"{'batch':>5s} {'ms/step':>9s} {'new tokens/s':>13s} {'per row':>9s} {'first token':>14s} "
          f"{'share of floor':>15s}")
    prompt = [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]
    for B in batches:
        run = dict(n_variations=B, length=args.tokens, device=device, eos=False, compile=args.compile and gpu,
                   cuda_graph=args.cuda_graph and gpu)
        cold, warm = {}, {}
        S.generate(model, prompt, seed=0, stats=cold, **run)  # the first run of this shape: compiles, captures
        S.generate(model, prompt, seed=1, stats=warm, **run)
        step = warm["step_s"]
        print(f"{B:5d} {step * 1e3:9.3f} {B / step:13.1f} {1 / step:9.1f} {cold['first_token_s'] * 1e3:11.1f} ms "
              f"{100 * floor / step:14.1f}%")


def rss_peak(reset=False):
    """This process's resident-set high-water mark in bytes (Linux /proc); reset=True restarts it
    from the current size first. None where /proc is missing."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def bench_train(args):
    """One optimizer step of --batch sequences as pretrain.py runs it (micro-batches and activation
    checkpointing from model.plan_batch, the chunked float32 loss model.LMLoss): ms/step, tokens/s,
    MFU, peak memory; --full_logits times the old loss over the full (B, T, V) float32 logits beside
    it. The data loader's tokens/s with --data."""
    import contextlib
    from dataclasses import replace
    import torch
    import torch.nn.functional as F
    import model as M
    _, _, device = M.setup_distributed(args.device)  # TF32 for float32 matmuls on CUDA, as the stage scripts
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    cfg = replace(M.PRESETS[args.preset], max_seq_len=max(args.seq_len, M.PRESETS[args.preset].max_seq_len))
    m = M.Aria(cfg).to(device).train()
    micro, m.config.grad_checkpoint, _, plan = M.plan_batch(m.config, args.seq_len, args.batch, device, args.micro_batch,
                                                         args.grad_checkpoint, dtype == "bfloat16")
    opt = M.configure_optimizer(m, device_type=device.type)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    batch = torch.randint(6, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def full_logits_loss(b):  # the loss before issue 21: all (B, T, V) logits, then float32
        with autocast:
            logits = m(b[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())

    lm_loss = M.LMLoss(m)

    def chunked_loss(b):
        with autocast:
            return lm_loss(b)
    fns = {"chunked": chunked_loss, "full": full_logits_loss}
    if device.type == "cuda" and args.compile:
        fns = {k: torch.compile(f) for k, f in fns.items()}
    loss_fn = fns["full" if args.full_logits else "chunked"]

    def step(fn=None):
        for i in range(0, args.batch, micro):
            ((fn or loss_fn)(batch[i:i + micro]) * micro / args.batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(fns["chunked"]), step(fns["full"]) if args.compare else step()
    sync()
    if args.compare:  # both losses in this process, alternating step by step (VMs vary 2x between runs)
        times = {k: [] for k in fns}
        for r in range(args.steps):
            for k in (list(fns) if r % 2 else list(fns)[::-1]):
                times[k].append(timed(lambda: (step(fns[k]), sync()), 1))
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"train: {args.preset}, batch {args.batch} x {args.seq_len} ({plan}), {dtype}, {device_name(device.type)}, "
              f"{args.steps} alternating steps each: chunked loss {t['chunked'] * 1e3:.0f} ms/step, full float32 logits "
              f"{t['full'] * 1e3:.0f} ms/step; chunked tokens/s = {t['full'] / t['chunked']:.3f}x the full loss's")
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_peak(reset=True)
    t = timed(lambda: (step(), sync()), args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak() - base if base else None
    tok_s = args.batch * args.seq_len / t
    mfu = M.estimate_mfu(cfg, args.seq_len, tok_s) if device.type == "cuda" else None
    print(f"train: {args.preset} ({m.num_params() / 1e6:.1f}M), batch {args.batch} x {args.seq_len} ({plan}), {dtype}, "
          f"{'full float32 logits' if args.full_logits else 'chunked loss'}, {device_name(device.type)}: "
          f"{t * 1e3:.0f} ms/step, {tok_s:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
          + (f", peak {'allocated' if device.type == 'cuda' else 'RSS growth in a step'} {peak / 2**20:,.0f} MiB" if peak else ""))
    if args.data:
        import pretrain
        ds = pretrain.PackedWindows(args.data, "train", args.seq_len, 0, True)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=M.StepSampler(0, args.batch, 1, 0, 1),
                                             num_workers=args.workers)
        it = iter(loader)
        next(it)
        n = max(4, args.steps)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        load_s = n * args.batch * args.seq_len / (time.perf_counter() - t0)
        print(f"data loader ({args.workers} workers, with augmentation): {load_s:,.0f} tokens/s "
              f"= {load_s / tok_s:.1f}x what the model consumes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tokenizer", help="tokenizer notes/s against mido's parse",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", help="MIDI files or folders (default: ../shared/aria/midi)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many files")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.set_defaults(fn=bench_tokenizer)
    p = sub.add_parser("sample", help="new tokens/s of sample.py's decode loop",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"],
                   help="model shape (random weights) when no --ckpt")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a preset")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (variations decoded together)")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per row")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the model's forward (sample.py --compile)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="CUDA: the decode step as one CUDA graph (sample.py --cuda_graph; experimental)")
    p.set_defaults(fn=bench_sample)
    p = sub.add_parser("train", help="forward+backward tokens/s and MFU; the data loader's tokens/s beside it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"], help="model shape")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (8192 for the paper's medium)")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step (paper §4.1: 16 per GPU)")
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per forward/backward (0: planned from the GPU's memory)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: matmuls under autocast, as pretrain.py on CUDA; auto: bfloat16 on CUDA")
    p.add_argument("--compile", type=int, default=1, help="torch.compile on CUDA (1/0)")
    p.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                   help="activation checkpointing (auto: only if no micro-batch fits without)")
    p.add_argument("--full_logits", action="store_true", help="the loss over all (B, T, V) float32 logits (before issue 21)")
    p.add_argument("--compare", action="store_true", help="time the chunked and the full-logits loss alternately in one process")
    p.add_argument("--data", default=None, help="a prepared dataset: also time the augmenting data loader")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.set_defaults(fn=bench_train)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.fn(args)


if __name__ == "__main__":
    main()
