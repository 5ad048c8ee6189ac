"""
Sample piano continuations from an Aria language model (paper §4: 45-second
continuations of 15-second prompts; official behaviour in SPEC §D.1-D.3).

    python sample.py prompt.mid --ckpt model.safetensors   # official aria-medium-gen (+ model.json beside it)
    python sample.py prompt.mid                             # latest checkpoint in out/pretrain
    python sample.py --ckpt out/pretrain --variations 4     # from scratch: piano prefix, <S>
    python sample.py prompt.mid --end --plot --continuation_only

Writes OUT/<prompt stem>_<i>.mid (prompt + continuation; with --continuation_only
the continuation alone, moved to start at 0 s) and OUT/<prompt stem>_<i>.json
(every setting, the checkpoint, token counts, tokens/s) for i = 1..--variations.

What it does, top to bottom:
- prompt (SPEC §D.1): the notes starting in the first --prompt_seconds, tokenized
  without <D> and <E> (tokenizer.prompt).
- model (SPEC §D.2): static KV cache, one prefill of the prompt, then one token
  per step for all variations at once; bf16 on CUDA, and --compile turns the
  decode step into a CUDA graph (torch.compile mode="reduce-overhead").
- sampling (SPEC §D.3): temperature, then top-k, top-p and min-p (the official
  default: drop tokens below min_p x the most likely one), then a draw from a
  torch.Generator seeded by --seed, on the device; temperature 0 is greedy.
  A row that has produced <E> is finished. --end is the official force_end: in
  the last 130 positions the first token sampled at an event boundary becomes
  <D>, the ending cue the generative finetune was trained with (paper §3.2).
- grammar (ours, not in the official code): every token is drawn only from the
  tokens that can legally come next in an Aria body, so every sample decodes
  (see Grammar below).
"""
import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

import model as M
import tokenizer as T

DEFAULT_CKPT = "out/pretrain"   # where the README quick start `python pretrain.py` trains into
FORCE_END_WINDOW = 130          # SPEC §D.3 force_end: the last 130 positions
CHECK_DONE_EVERY = 64           # steps between "all rows finished?" checks (a host sync)

# -----------------------------------------------------------------------------
# The token grammar. A body (after `prefix <S>`) is  (event | <T> | <D>)* <E>  with
#   event = note onset dur  |  drum onset
# A row's state says where it stands; "+ DIM_USED" once it has seen <D> (at most one).
#   START       event boundary, nothing completed just before (after <S>, <T>, <D>)
#   EVENT       event boundary right after a complete event: <E> is allowed only here
#   NOTE        after a note token: an onset
#   NOTE_ONSET  after a note's onset: a duration (10..5000 ms; dur 0 never occurs)
#   DRUM        after a drum token: an onset
#   DONE        after <E>: only <P>
# At a boundary: notes of the instruments named in the row's prefix (never the
# velocity-0 ids, which the tokenizer never produces), drums if the drum prefix is
# there, <T>, <D> (once), <E> (only in EVENT). Onsets never go back in time inside
# a segment: an onset is >= the last onset since the last <T>. <S>, <P>, <U> and
# prefix tokens never appear in a body.

START, EVENT, NOTE, NOTE_ONSET, DRUM, DONE = range(6)
DIM_USED = 6
N_STATES = 12


def _next_state(state, tok):
    """State after token `tok`. Total: tokens the grammar forbids (possible in a user's
    prompt or with grammar=False) move to the nearest sensible state."""
    s, dim = state % DIM_USED, state - state % DIM_USED
    cls = T.TOKEN_CLASS[tok]
    if s == DONE:
        return state
    if tok == T.EOS_ID:
        s = DONE
    elif tok == T.DIM_ID:
        s, dim = START, DIM_USED
    elif cls == T.NOTE:
        s = NOTE
    elif cls == T.DRUM:
        s = DRUM
    elif cls == T.ONSET:
        s = NOTE_ONSET if s == NOTE else EVENT
    elif cls == T.DUR:
        s = EVENT
    else:  # <T>, and <S> <P> <U> / prefixes, which are not grammatical in a body
        s = START
    return s + dim


def _tables():
    """(N_STATES, V) bool: tokens allowed in each state; (N_STATES, V) next state;
    (N_STATES,) whether the state expects an onset (then the onset lower bound applies)."""
    V = T.VOCAB_SIZE
    cls = torch.from_numpy(T.TOKEN_CLASS.astype("int64"))
    ids = torch.arange(V)
    note_ok = (cls == T.NOTE) & ((ids - T.NOTE_START) % 13 != 0)   # velocity 0 excluded
    boundary = note_ok | (cls == T.DRUM)
    boundary[T.SEG_ID] = True
    allowed = torch.zeros(N_STATES, V, dtype=torch.bool)
    for dim in (0, DIM_USED):
        allowed[START + dim] = boundary
        allowed[START + dim, T.DIM_ID] = dim == 0
        allowed[EVENT + dim] = allowed[START + dim]
        allowed[EVENT + dim, T.EOS_ID] = True
        allowed[NOTE + dim] = cls == T.ONSET
        allowed[DRUM + dim] = cls == T.ONSET
        allowed[NOTE_ONSET + dim] = (cls == T.DUR) & (ids != T.DUR_START)
        allowed[DONE + dim, T.PAD_ID] = True
    # next-state table: tokens of one class act alike, except the specials
    groups = [[i] for i in range(T.PREFIX_START)] + [ids[cls == c] for c in (T.PREFIX, T.NOTE, T.DRUM, T.ONSET, T.DUR)]
    nxt = torch.empty(N_STATES, V, dtype=torch.long)
    for state in range(N_STATES):
        for group in groups:
            nxt[state, group] = _next_state(state, int(group[0]))
    expects_onset = torch.tensor([s % DIM_USED in (NOTE, DRUM) for s in range(N_STATES)])
    return allowed, nxt, expects_onset


_TABLES = None


def prompt_info(ids):
    """What a prompt fixes for its continuation: (instruments named in the prefix,
    grammar state after the prompt, last onset id in its last segment)."""
    ids = [int(i) for i in ids]
    if T.BOS_ID not in ids:
        raise ValueError("prompt has no <S>: expected `prefix <S> body` (tokenizer.prompt gives one)")
    if T.EOS_ID in ids:
        raise ValueError("prompt contains <E>: the piece is already over; remove it to continue")
    bos = ids.index(T.BOS_ID)
    names = {i: name for name, i in T.INSTRUMENT_PREFIX_ID.items()}
    instruments = {names[i] for i in ids[:bos] if i in names}
    if not instruments:
        raise ValueError("prompt prefix names no instrument, so no note could follow")
    state, last = START, T.ONSET_START
    for i in ids[bos + 1:]:
        state = _next_state(state, i)
        if i == T.SEG_ID:
            last = T.ONSET_START
        elif T.TOKEN_CLASS[i] == T.ONSET:
            last = i
    return instruments, state, last


class Grammar:
    """Per-row grammar state for a batch, kept on the device: allowed() is a (B, V)
    mask built from one precomputed (N_STATES, V) table, the row's instrument mask
    and one comparison for the onset lower bound; advance() is a table lookup."""

    def __init__(self, prompts, device="cpu", eos=True):
        global _TABLES
        if _TABLES is None:
            _TABLES = _tables()
        allowed, nxt, expects = _TABLES
        self.table, self.next, self.expects_onset = allowed.to(device), nxt.to(device), expects.to(device)
        V = T.VOCAB_SIZE
        rows, states, lasts = [], [], []
        for p in prompts:
            instruments, state, last = prompt_info(p)
            row = torch.ones(V, dtype=torch.bool)
            for k, name in enumerate(T.INSTRUMENTS):
                if name not in instruments:
                    start = T.NOTE_START + k * T.NOTES_PER_INSTRUMENT
                    row[start:start + T.NOTES_PER_INSTRUMENT] = False
            if "drum" not in instruments:
                row[T.DRUM_START:T.DUR_START] = False
            row[T.EOS_ID] = eos
            rows.append(row)
            states.append(state)
            lasts.append(last)
        self.row_allowed = torch.stack(rows).to(device)                # (B, V)
        self.state = torch.tensor(states, dtype=torch.long, device=device)  # (B,)
        self.last_onset = torch.tensor(lasts, dtype=torch.long, device=device)  # (B,) onset id
        self.vocab_ids = torch.arange(V, device=device)

    def allowed(self):
        """(B, V) bool: the tokens each row may take next."""
        lower = torch.where(self.expects_onset[self.state], self.last_onset, 0)  # (B,)
        return self.table[self.state] & self.row_allowed & (self.vocab_ids >= lower[:, None])

    def advance(self, tok):
        """Move every row past its token tok (B,)."""
        self.state = self.next[self.state, tok]
        is_onset = tok >= T.ONSET_START
        self.last_onset = torch.where(tok == T.SEG_ID, T.ONSET_START,
                                      torch.where(is_onset, tok, self.last_onset))

    @property
    def done(self):
        return self.state % DIM_USED == DONE

    @property
    def dim_used(self):
        return self.state >= DIM_USED


# -----------------------------------------------------------------------------
# Sampling


def pick(logits, temp, top_k=0, top_p=None, min_p=0.0, generator=None):
    """(B, V) logits (-inf where banned) -> (B,) ids. Order: temperature, top-k,
    top-p, min-p, then a draw. Works on logits: min-p's p_i < min_p * p_max is
    x_i < x_max + log(min_p), and the draw is argmax(x + Gumbel noise), which picks
    i with probability softmax(x)_i without a host sync (and is cheaper on CPU than
    torch.multinomial or exponential_)."""
    x = logits.float()
    if temp == 0:
        return x.argmax(-1)
    x = x / temp
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = x.sort(-1, descending=True)
        p = srt.softmax(-1)
        srt = srt.masked_fill(p.cumsum(-1) - p > top_p, float("-inf"))  # keeps the token crossing top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    if min_p:
        x = x.masked_fill(x < x.amax(-1, keepdim=True) + math.log(min_p), float("-inf"))
    u = torch.rand(x.shape, generator=generator, device=x.device)  # [0, 1): -log(-log u) is never +inf
    return (x - torch.log(-torch.log(u))).argmax(-1)


def _decode_step(model, tok, pos):
    return model(tok, input_pos=pos)[:, 0]


_compiled = {}


def _compiled_decode(options):
    key = tuple(sorted(options.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(_decode_step, **options)
    return _compiled[key]


def _ensure_cache(model, batch, length, dtype, device):
    # reuse same-shaped buffers: a compiled CUDA graph keeps pointing at them
    kv = model.model.encode_layers[0].kv_cache
    if kv is not None and kv.k.shape[0] == batch and kv.k.shape[2] == length and kv.k.dtype == dtype \
            and kv.k.device == device and model.model.cache_visible is not None:
        model.model.cache_visible.fill_(True)
        return
    model.setup_cache(batch, length, dtype=dtype, device=device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _as_prompts(prompt_ids):
    """One prompt (ids) or several (lists of ids, or a 2-D tensor) -> list of lists of int."""
    if hasattr(prompt_ids, "tolist"):  # tensor / numpy array
        prompt_ids = prompt_ids.tolist()
    prompt_ids = [p.tolist() if hasattr(p, "tolist") else p for p in prompt_ids]
    if prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
        return [[int(i) for i in p] for p in prompt_ids]
    return [[int(i) for i in prompt_ids]]


@torch.no_grad()
def generate(model, prompt_ids, n_variations=1, length=2048, temp=0.98, min_p=0.035, top_p=None,
             top_k=0, seed=0, end=False, device=None, grammar=True, eos=True, compile=False, stats=None,
             progress=None):
    """Continue prompts; returns one full token list per row (prompt + new tokens,
    cut after <E> when one was produced).

    prompt_ids: one prompt (list of ids, `prefix <S> body`, no <E>) sampled
                n_variations times, or a list of prompts (each n_variations times)
    length:     new tokens at most, capped by the model's max_seq_len minus the prompt
    temp:       0 = greedy; top_k 0 and top_p None/1.0 are off; min_p 0 is off
    seed:       seeds a torch.Generator on the device (same seed, same output)
    end:        force_end (SPEC §D.3): in each row's last 130 positions its first token
                at an event boundary becomes <D> (if the row has no <D> yet)
    grammar:    only tokens that can legally come next (see Grammar); False = official
    eos:        False never samples <E> (fixed-length runs, benchmarks)
    compile:    True: on CUDA, torch.compile the decode step with mode="reduce-overhead"
                (CUDA graphs), elsewhere ignored; a dict: torch.compile(**compile) anywhere
    device:     where to run (the model is moved there); default: where the model is
    stats:      a dict to fill with timings and counts
    progress:   called as progress(steps_done, length) every 64 steps
    """
    prompts = _as_prompts(prompt_ids)
    rows = [p for p in prompts for _ in range(n_variations)]
    B, V = len(rows), model.config.vocab_size
    if n_variations < 1 or not all(rows):
        raise ValueError("need n_variations >= 1 and non-empty prompts")
    if V != T.VOCAB_SIZE:
        raise ValueError(f"model vocabulary {V} != tokenizer vocabulary {T.VOCAB_SIZE}")
    if getattr(model, "lm_head", None) is None:
        raise ValueError(f"the model has no LM head (heads: {model.heads})")
    device = torch.empty(0, device=device if device is not None else model.lm_head.weight.device).device
    model = model.to(device)
    dtype = model.lm_head.weight.dtype
    n = torch.tensor([len(p) for p in rows], device=device)
    P = max(len(p) for p in rows)
    length = min(length, model.config.max_seq_len - P)
    if length < 1:
        raise ValueError(f"prompt of {P} tokens leaves no room in the model's context "
                         f"({model.config.max_seq_len} tokens)")
    g = Grammar(rows, device, eos=eos)
    gen = torch.Generator(device=device).manual_seed(seed)
    seq = torch.full((B, P + length), T.PAD_ID, dtype=torch.long, device=device)
    for b, p in enumerate(rows):
        seq[b, :len(p)] = torch.tensor(p, device=device)
    ar = torch.arange(B, device=device)
    end_from = n + length - FORCE_END_WINDOW  # (B,) first position of each row's force_end window

    decode, graphs = _decode_step, False
    if compile is True and device.type == "cuda":
        compile = dict(mode="reduce-overhead", fullgraph=True)  # static cache + CUDA graphs (gpt-fast)
    if isinstance(compile, dict):
        decode, graphs = _compiled_decode(compile), compile.get("mode") == "reduce-overhead"

    _sync(device)
    t0 = time.perf_counter()
    _ensure_cache(model, B, P + length, dtype, device)
    logits = model(seq[:, :P], input_pos=torch.arange(P, device=device), out_pos=n - 1)  # (B, V)
    _sync(device)
    t1 = time.perf_counter()
    pos = n.clone()  # where each row's next token goes
    steps = 0
    for steps in range(1, length + 1):
        if grammar:
            logits = logits.masked_fill(~g.allowed(), float("-inf"))
        tok = pick(logits, temp, top_k, top_p, min_p, gen)
        if end:  # official rule: the first token that is not a dur/onset (= at an event boundary)
            force = (tok < T.DUR_START) & ~g.dim_used & (pos >= end_from)
            tok = torch.where(force, T.DIM_ID, tok)
        tok = torch.where(g.done, T.PAD_ID, tok)
        seq[ar, pos] = tok
        g.advance(tok)
        if steps == length:
            break
        if steps % CHECK_DONE_EVERY == 0:
            if bool(g.done.all()):
                break
            if progress is not None:
                progress(steps, length)
        if graphs:  # the last step's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        logits = decode(model, tok[:, None], pos[:, None])
        pos = pos + 1
    out = seq.tolist()  # the one big copy to the host
    t2 = time.perf_counter()

    results = []
    for b, row in enumerate(out):
        row = row[:len(rows[b]) + steps]
        if T.EOS_ID in row:
            row = row[:row.index(T.EOS_ID) + 1]
        results.append(row)
    if stats is not None:
        new = sum(len(r) - len(p) for r, p in zip(results, rows))
        stats.update(prefill_tokens=int(n.sum()), prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps,
                     batch=B, new_tokens=new, tokens_per_s=new / max(t2 - t0, 1e-9),
                     decode_tokens_per_s=B * steps / max(t2 - t1, 1e-9), device=str(device),
                     dtype=str(dtype).replace("torch.", ""))
    return results


# -----------------------------------------------------------------------------
# Output: MIDI files, JSON sidecars, piano rolls


def split_notes(row, n_prompt):
    """(prompt notes, continuation notes, channel programs) of a full row, in ms. The
    continuation's onsets count from its segment, so it is decoded together with the
    prompt (which supplies the prefix, <S> and the <T>s before it)."""
    notes, programs = T.detokenize_notes(row)
    k = len(T.detokenize_notes(row[:n_prompt])[0])  # an event cut by the prompt's end counts as new
    return notes[:k], notes[k:], programs


def continuation_midi(row, n_prompt):
    """The continuation alone as a mido.MidiFile, moved so that its first note starts at 0."""
    _, notes, programs = split_notes(row, n_prompt)
    t0 = min((n[0] for n in notes), default=0)
    return T.notes_to_midi([(s - t0, e - t0, p, v, c) for s, e, p, v, c in notes], programs)


def plot_roll(prompt_notes, new_notes, path, title):
    """A piano-roll PNG, prompt and continuation in two colours. False if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(14, 5))
    for notes, color, label in ((prompt_notes, "tab:blue", "prompt"), (new_notes, "tab:orange", "continuation")):
        if notes:
            ax.barh([n[2] for n in notes], [(n[1] - n[0]) / 1000 for n in notes],
                    left=[n[0] / 1000 for n in notes], height=0.8, color=color, label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# CLI


class Fail(Exception):
    """A one-line error for the user (exit status 1, no traceback)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other bad input
        raise Fail(message)


def build_parser():
    ap = Parser(prog="sample.py", description="Continue a MIDI prompt (or start from scratch) with an Aria model.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", nargs="?", default=None,
                    help="MIDI file to continue; leave out to generate from scratch (piano prefix, <S>)")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT,
                    help="checkpoint: official .safetensors (config X.json beside it, or inferred), "
                         "our .pt, or a folder (its latest checkpoint)")
    ap.add_argument("--out", default="samples", help="output folder")
    ap.add_argument("--prompt_seconds", type=float, default=15.0,
                    help="continue the notes that start in the first this many seconds (paper §4)")
    ap.add_argument("--variations", type=int, default=1,
                    help="continuations, sampled as one batch (the paper's listening test used 8 per prompt)")
    ap.add_argument("--length", type=int, default=2048,
                    help="new tokens at most (official default); capped by the model's context minus the prompt")
    ap.add_argument("--temp", type=float, default=0.98, help="temperature in [0, 2]; 0 = greedy")
    ap.add_argument("--min_p", type=float, default=0.035,
                    help="drop tokens less likely than min_p x the most likely one; 0 = off")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling in (0, 1]; unset or 1 = off")
    ap.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens; 0 = off")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the sampler: same seed, checkpoint and device give byte-identical MIDI")
    ap.add_argument("--end", action="store_true",
                    help="steer toward an ending: <D> in the last 130 positions (official force_end; "
                         "a generatively finetuned model then ends with <E>)")
    ap.add_argument("--no_grammar", action="store_true",
                    help="sample from the whole vocabulary, as the official code does (output may not decode)")
    ap.add_argument("--continuation_only", action="store_true",
                    help="write only the continuation, moved to start at 0 s")
    ap.add_argument("--plot", action="store_true", help="also write a piano-roll PNG (needs matplotlib)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                    help="auto: cuda, else mps, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights and KV cache; auto: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads; 0 = torch's default (on a busy 2-core machine 1 is often faster)")
    ap.add_argument("--compile", action="store_true",
                    help="CUDA: torch.compile the decode step (static KV cache + CUDA graphs); "
                         "the first steps pay for compiling")
    return ap


def check_args(a):
    problems = [
        (a.prompt_seconds <= 0, f"--prompt_seconds must be > 0 (got {a.prompt_seconds:g})"),
        (a.variations < 1, f"--variations must be >= 1 (got {a.variations})"),
        (a.length < 1, f"--length must be >= 1 (got {a.length})"),
        (not 0 <= a.temp <= 2, f"--temp must be in [0, 2] (got {a.temp:g})"),
        (not 0 <= a.min_p < 1, f"--min_p must be in [0, 1) (got {a.min_p:g})"),
        (a.top_p is not None and not 0 < a.top_p <= 1, f"--top_p must be in (0, 1] (got {a.top_p})"),
        (a.top_k < 0, f"--top_k must be >= 0 (got {a.top_k})"),
        (a.threads < 0, f"--threads must be >= 0 (got {a.threads})"),
    ]
    for bad, msg in problems:
        if bad:
            raise Fail(msg)


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise Fail("--device cuda: no CUDA device available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise Fail("--device mps: MPS is not available")
    return name


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_prompt(a):
    if a.prompt is None:
        return [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]
    try:
        ids = T.prompt(a.prompt, a.prompt_seconds)
    except T.TokenizerError as e:
        raise Fail(str(e)) from None
    if not any(T.TOKEN_CLASS[i] in (T.NOTE, T.DRUM) for i in ids):
        raise Fail(f"{a.prompt}: no notes start in the first {a.prompt_seconds:g} s; raise --prompt_seconds, "
                   "or leave out the prompt to generate from scratch")
    return ids


def load_lm(a, device, dtype):
    if a.ckpt == DEFAULT_CKPT:
        try:
            M.resolve_checkpoint(a.ckpt)
        except M.CheckpointError:
            raise Fail(f"no checkpoint at {DEFAULT_CKPT} — run `python pretrain.py` first or pass --ckpt") from None
    try:
        path = M.resolve_checkpoint(a.ckpt)
        model = M.load_model(path, device=device, dtype=dtype)
    except M.CheckpointError as e:
        raise Fail(str(e)) from None
    if "lm" not in model.heads:
        raise Fail(f"{path}: no LM head (it has {', '.join(model.heads)}): sampling needs a generative "
                   "checkpoint (aria-medium-gen / -base, or one from pretrain.py)")
    return model, path


def main(argv=None):
    warnings.formatwarning = lambda msg, *rest, **kw: f"warning: {msg}\n"
    try:
        return run(argv)
    except Fail as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1


def run(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    if a.compile and device != "cuda":
        print(f"note: --compile applies to CUDA only; decoding eagerly on {device}")
    ids = load_prompt(a)
    model, ckpt_path = load_lm(a, device, dtype)
    name = Path(a.prompt).stem if a.prompt else "scratch"
    what = f"{a.prompt}, first {a.prompt_seconds:g} s" if a.prompt else "from scratch"
    print(f"prompt: {what}: {len(ids)} tokens, {len(T.detokenize_notes(ids)[0])} notes")
    print(f"model: {ckpt_path}, {model.num_params() / 1e6:.1f}M parameters, {device} "
          f"{str(dtype).replace('torch.', '')}")
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise Fail(f"the prompt has {len(ids)} tokens, the model's context is {model.config.max_seq_len}; "
                   "use a shorter --prompt_seconds")
    length = min(a.length, room)
    if length < a.length:
        print(f"note: --length {a.length} capped at {length} (context {model.config.max_seq_len} "
              f"minus the {len(ids)}-token prompt)")

    stats, t0, last = {}, time.perf_counter(), [time.perf_counter()]

    def progress(steps, total):  # a line every ~10 s on slow machines
        now = time.perf_counter()
        if now - last[0] > 10:
            last[0] = now
            print(f"  {steps}/{total} steps, {steps * a.variations / (now - t0):.1f} tokens/s", flush=True)

    rows = generate(model, ids, a.variations, length, a.temp, a.min_p, a.top_p, a.top_k, a.seed, a.end,
                    device, grammar=not a.no_grammar, compile=a.compile and device == "cuda", stats=stats,
                    progress=progress)
    print(f"generated {stats['new_tokens']} new tokens ({a.variations} x up to {length}) in "
          f"{stats['prefill_s'] + stats['decode_s']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s "
          f"(decode {stats['decode_tokens_per_s']:.1f} tokens/s{', compile time included' if a.compile and device == 'cuda' else ''})")

    out = Path(a.out)
    plot_missing = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows, 1):
            stem = out / f"{name}_{i}"
            old, new, _ = split_notes(row, len(ids))
            midi = continuation_midi(row, len(ids)) if a.continuation_only else T.detokenize(row)
            midi.save(f"{stem}.mid")
            side = {
                "midi": f"{stem}.mid", "prompt": a.prompt, "prompt_seconds": a.prompt_seconds if a.prompt else None,
                "checkpoint": str(ckpt_path), "variation": i, "seed": a.seed,
                "n_prompt_tokens": len(ids), "n_new_tokens": len(row) - len(ids), "ended": row[-1] == T.EOS_ID,
                "n_prompt_notes": len(old), "n_new_notes": len(new),
                "continuation_only": a.continuation_only, "tokens_per_s": round(stats["tokens_per_s"], 2),
                "decode_tokens_per_s": round(stats["decode_tokens_per_s"], 2),
                "device": stats["device"], "dtype": stats["dtype"], "length": length,
                "settings": vars(a), "ids": row,
            }
            text = json.dumps({**side, "ids": None}, indent=1).replace('"ids": null', f'"ids": {json.dumps(row)}')
            Path(f"{stem}.json").write_text(text + "\n")
            written = [f"{stem}.mid", f"{stem}.json"]
            if a.plot and not plot_missing:
                if plot_roll(old, new, f"{stem}.png", f"{name} #{i} (seed {a.seed})"):
                    written.append(f"{stem}.png")
                else:
                    plot_missing = True
                    print("note: matplotlib is not installed; no piano roll written (pip install matplotlib)")
            end = "ends with <E>" if side["ended"] else "no <E>"
            print(f"wrote {', '.join(written)}: {len(new)} new notes, {side['n_new_tokens']} new tokens, {end}")
    except OSError as e:
        raise Fail(f"{out}: cannot write ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
