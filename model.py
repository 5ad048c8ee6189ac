"""
The Aria transformer: a small, flat PyTorch reimplementation.

Aria ("Scaling Self-Supervised Representation Learning for Symbolic Piano
Performance", ISMIR 2025) is a LLaMA-3.2-style decoder with a few changes:
pre-LN with nn.LayerNorm (bias, eps 1e-5), full multi-head attention with a
fused bias-free QKV projection, RoPE theta=500000 in the rotate-half layout,
SwiGLU FFN, final LayerNorm, untied heads. One trunk serves every use:

    lm       lm_head            (B, T, vocab)  next-token logits (pretraining, generation)
    emb      emb_head           (B, T, E)      contrastive embedding, read at <E>
    cls      class_head         (B, T, C)      classifier logits, read at <E>
    adapter  embedding_adapter  E -> d         conditions the LM on an embedding

Parameter names are the official ones, so official safetensors load unchanged.
Follows ../shared/aria/SPEC.md: B (architecture), C.2-C.4 (how heads are used
in training), D.2-D.4 (KV cache, conditioned generation, embeddings).
File order: config, layers (incl. KV cache), model, checkpoint I/O, perf helpers.
"""
import json
import os
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VOCAB_SIZE = 17727  # the AbsTokenizer vocabulary (SPEC A.2), also in tokenizer.py
ROPE_THETA = 500000.0
HEAD_DIM = 64  # official head width; used to guess n_heads when no config is given


# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    # field names, order and defaults match the official ModelConfig (SPEC B),
    # so official JSON configs load and ours load in the official code
    d_model: int
    n_heads: int
    n_layers: int
    ff_mult: int = 4
    drop_p: float = 0.0  # unused, as in the official code
    max_seq_len: int = 8192
    grad_checkpoint: bool = False
    resid_dropout: float = 0.0
    vocab_size: int = VOCAB_SIZE
    class_size: int | None = None
    emb_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    # official aria-medium: 658,538,496 parameters with lm_head, 64-wide heads
    "medium": ModelConfig(d_model=1536, n_heads=24, n_layers=16, max_seq_len=8192),
    # GPT-2-small shape, ~137M parameters: about 1/5 of medium's compute per
    # token, for pretraining experiments on one GPU in a day
    "small": ModelConfig(d_model=768, n_heads=12, n_layers=12, max_seq_len=8192),
    # CPU demos and tests; 64-wide heads so shape inference (load_model) still works
    "tiny": ModelConfig(d_model=128, n_heads=2, n_layers=4, max_seq_len=2048),
}

# head kind -> official attribute (and state-dict prefix)
HEAD_ATTRS = {"lm": "lm_head", "emb": "emb_head", "cls": "class_head", "adapter": "embedding_adapter"}
OUTPUT_HEADS = ("lm", "emb", "cls")  # preference order for the default head


# -----------------------------------------------------------------------------
# layers


class Rotary(nn.Module):
    """cos/sin tables of RoPE, (max_seq_len, Dh/2). Non-persistent buffers, so not
    in the state dict; rebuilt in float32 whenever the module is moved or cast,
    so model.to(bfloat16) does not round them (official training uses float32)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        self.head_dim, self.max_seq_len = head_dim, max_seq_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(None)

    def _build(self, device):
        d = self.head_dim
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
        angle = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        self.cos, self.sin = angle.cos(), angle.sin()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._build(self.cos.device)
        return self


def apply_rope(x, cos, sin):
    # x: (B, T, H, Dh); cos/sin broadcast to (B|1, T, 1, Dh/2). Rotate-half layout
    # (HF Llama convention), computed in float32 as in official training.
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache(nn.Module):
    """Static (B, H, L, Dh) key/value buffers, written in place at given positions."""

    def __init__(self, batch_size, n_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        # pos: (B, T); k, v: (B, H, T, Dh). scatter_ keeps shapes static (CUDA graphs)
        # and lets every row write at its own positions.
        B, H, T, D = k.shape
        idx = pos[:, None, :, None].expand(B, H, T, D)
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        return self.k, self.v


class Block(nn.Module):
    """Pre-LN block: x + drop(attn(norm1(x))), then x + drop(ffn(norm2(x)))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, hidden = cfg.d_model, cfg.ff_mult * cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.mixed_qkv = nn.Linear(d, 3 * d, bias=False)
        self.att_proj_linear = nn.Linear(d, d, bias=False)
        self.ff_gate_proj = nn.Linear(d, hidden, bias=False)
        self.ff_up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_down_proj = nn.Linear(hidden, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        # "layerwise dropout": 0 at the first layer rising linearly to resid_dropout
        # at the last (official classifier finetune uses 0.2, SPEC B / C.4)
        self.dropout = nn.Dropout(cfg.resid_dropout * layer_idx / max(1, cfg.n_layers - 1))
        self.kv_cache: KVCache | None = None

    def attention(self, x, cos, sin, pos=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.mixed_qkv(x).chunk(3, dim=-1)  # 3 x (B, T, C), order q|k|v
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh)
        if pos is None:
            # no padding/document mask, as in official training; flash kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.kv_cache.update(pos, k, v)  # (B, H, L, Dh): the whole cache
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask).to(x.dtype)
        return self.att_proj_linear(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, cos, sin, pos=None, mask=None):
        x = x + self.dropout(self.attention(self.norm1(x), cos, sin, pos, mask))
        h = self.norm2(x)
        return x + self.dropout(self.ff_down_proj(F.silu(self.ff_gate_proj(h)) * self.ff_up_proj(h)))


class Transformer(nn.Module):
    """The trunk (official `Transformer`): token embedding, blocks, final LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encode_layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.out_layer_norm = nn.LayerNorm(cfg.d_model)
        self.rope = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len)
        # (B, L) which cache slots may be attended at all; lets CFG rows hide the
        # conditioning slot 0 (SPEC D.3). Allocated by Aria.setup_cache.
        self.register_buffer("cache_visible", None, persistent=False)

    def forward(self, h, input_pos=None):
        # h: (B, T, d) input embeddings -> (B, T, d) after out_layer_norm
        B, T, _ = h.shape
        mask = pos = None
        if input_pos is None:
            if T > self.rope.max_seq_len:
                raise ValueError(f"sequence length {T} > max_seq_len {self.rope.max_seq_len}")
            cos, sin = self.rope.cos[None, :T, None], self.rope.sin[None, :T, None]
        else:
            if self.cache_visible is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache() first")
            pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(B, T)  # (B, T)
            cos, sin = self.rope.cos[pos][:, :, None], self.rope.sin[pos][:, :, None]
            L = self.cache_visible.shape[1]
            key_pos = torch.arange(L, device=h.device)
            # (B, 1, T, L): each query sees cache slots at or before its own position.
            # Stale slots (right padding of a shorter row) lie after the row's current
            # position and are overwritten before they become visible.
            mask = (key_pos[None, None, None, :] <= pos[:, None, :, None]) & self.cache_visible[:, None, None, :]
        use_ckpt = self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.encode_layers:
            if use_ckpt:
                h = checkpoint(layer, h, cos, sin, pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos, mask)
        return self.out_layer_norm(h)


# -----------------------------------------------------------------------------
# the model: trunk + selectable heads


class Aria(nn.Module):
    """Trunk `self.model` plus any of lm_head / emb_head / class_head /
    embedding_adapter. `heads` lists kinds from HEAD_ATTRS; the first output head
    is the default one returned by forward. heads=None picks one from the config:
    cls if class_size, else emb if emb_size, else lm. The official classes are
    Aria(cfg, ("lm",)), ("emb",), ("cls",), and ("lm", "adapter") for LM_CND."""

    def __init__(self, config: ModelConfig, heads=None):
        super().__init__()
        self.config = replace(config)  # own copy: set_head edits it
        if heads is None:
            heads = ("cls",) if config.class_size else ("emb",) if config.emb_size else ("lm",)
        heads = tuple(heads)
        if not any(h in OUTPUT_HEADS for h in heads):
            raise ValueError(f"heads={heads} has no output head (one of {OUTPUT_HEADS})")
        self.model = Transformer(self.config)
        for attr in HEAD_ATTRS.values():
            setattr(self, attr, None)
        self.default_head = None
        for kind in heads:
            self.set_head(kind, keep_others=True)
        self.default_head = next(h for h in heads if h in OUTPUT_HEADS)

    # --- heads

    @property
    def heads(self) -> tuple:
        return tuple(k for k, a in HEAD_ATTRS.items() if getattr(self, a) is not None)

    def set_head(self, kind: str, size: int | None = None, keep_others: bool = False):
        """Create a freshly initialised head (PyTorch default init) and return it.
        For finetuning from a pretrained LM: set_head("emb", 512) or set_head("cls", 4)
        drops the other heads and makes the new one the default; keep_others=True
        keeps them. "adapter" only adds embedding_adapter (conditioned LM)."""
        cfg, d = self.config, self.config.d_model
        if kind not in HEAD_ATTRS:
            raise ValueError(f"unknown head {kind!r}; expected one of {tuple(HEAD_ATTRS)}")
        dropping = kind != "adapter" and not keep_others
        if kind == "lm":
            if size not in (None, cfg.vocab_size):
                raise ValueError(f"lm head size must be vocab_size={cfg.vocab_size}")
            shape = (d, cfg.vocab_size)
        elif kind == "cls":
            cfg.class_size = size or cfg.class_size
            if not cfg.class_size:
                raise ValueError("cls head needs a size (class_size)")
            shape = (d, cfg.class_size)
        else:  # emb_head and embedding_adapter share emb_size, as in the official config
            sharing = {"emb", "adapter"} & set(self.heads) - {kind}
            if size and cfg.emb_size and size != cfg.emb_size and sharing and not dropping:
                raise ValueError(f"emb_size {size} conflicts with the {sharing.pop()} head's {cfg.emb_size}")
            cfg.emb_size = size or cfg.emb_size
            if not cfg.emb_size:
                raise ValueError(f"{kind} head needs a size (emb_size)")
            shape = (d, cfg.emb_size) if kind == "emb" else (cfg.emb_size, d)
        if dropping:
            for attr in HEAD_ATTRS.values():
                setattr(self, attr, None)
        w = self.model.tok_embeddings.weight
        head = nn.Linear(*shape, bias=False, device=w.device, dtype=w.dtype)
        setattr(self, HEAD_ATTRS[kind], head)
        if kind != "adapter" and (dropping or self.default_head is None):
            self.default_head = kind
        return head

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.tok_embeddings.weight.numel() if exclude_embedding else n

    # --- forward

    def hidden(self, ids, emb=None, input_pos=None):
        """Final-LayerNorm output. ids: (B, T) -> (B, T, d), or (B, T-1, d) with emb."""
        h = self.model.tok_embeddings(ids)  # (B, T, d)
        if emb is not None:
            if self.embedding_adapter is None:
                raise ValueError("emb given but the model has no embedding_adapter")
            if input_pos is not None:
                raise ValueError("with a KV cache, condition once via fill_condition(emb)")
            # official TransformerLM_CND: the adapted embedding takes position 0 and
            # the last token falls off, so the output stays aligned with the targets
            c = self.embedding_adapter(emb.to(self.embedding_adapter.weight.dtype))[:, None]  # (B, 1, d)
            h = torch.cat([c.to(h.dtype), h[:, :-1]], dim=1)
            return self.model(h)[:, 1:]
        if self.embedding_adapter is not None and self.training:
            # DDP needs every parameter in the graph; official code does the same
            h = h + 0.0 * self.embedding_adapter.weight.sum()
        return self.model(h, input_pos)

    def forward(self, ids, emb=None, input_pos=None, head=None, out_pos=None):
        """ids (B, T) -> default (or `head`) output at every position: LM logits
        (B, T, V), embeddings (B, T, E) or class logits (B, T, C); T-1 positions
        with emb. out_pos (B,) gathers one position per row first -> (B, out):
        the <E> position for emb/cls, the last prompt token after a prefill."""
        h = self.hidden(ids, emb, input_pos)
        if out_pos is not None:
            h = h[torch.arange(h.shape[0], device=h.device), out_pos]  # (B, d)
        kind = head or self.default_head
        if kind not in OUTPUT_HEADS or getattr(self, HEAD_ATTRS[kind]) is None:
            raise ValueError(f"model has no {kind!r} head (has {self.heads})")
        return getattr(self, HEAD_ATTRS[kind])(h)

    # --- KV cache for incremental decoding (SPEC D.2, gpt-fast style)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None):
        """Preallocate static per-layer K/V buffers (B, H, L, Dh); dtype defaults to
        the weights' (pass bf16 when sampling under autocast). Then, for prompts of
        lengths n (B,) right-padded to (B, P):
            logits = model(prompt, input_pos=torch.arange(P), out_pos=n - 1)  # (B, V)
            pos = n                                                            # (B,)
            loop: logits = model(next_tok[:, None], input_pos=pos[:, None])[:, 0]; pos += 1
        Every call writes K/V at its positions and attends to slots <= its own
        position, so a row never sees the padding it later overwrites. Decode calls
        have static shapes: torch.compile(mode="reduce-overhead", fullgraph=True)."""
        cfg, w = self.config, self.model.tok_embeddings.weight
        L = max_seq_len or cfg.max_seq_len
        if L > self.model.rope.max_seq_len:
            raise ValueError(f"cache length {L} > max_seq_len {self.model.rope.max_seq_len}")
        dtype, device = dtype or w.dtype, device or w.device
        for layer in self.model.encode_layers:
            layer.kv_cache = KVCache(batch_size, cfg.n_heads, L, cfg.d_model // cfg.n_heads, dtype, device)
        self.model.cache_visible = torch.ones(batch_size, L, dtype=torch.bool, device=device)

    def clear_cache(self):
        for layer in self.model.encode_layers:
            layer.kv_cache = None
        self.model.cache_visible = None

    @torch.no_grad()
    def fill_condition(self, emb, use_cond=None):
        """Write adapter(emb) (B, E) into cache slot 0 (official fill_condition_kv);
        tokens then go at positions 1... use_cond (B,) bool hides slot 0 from rows
        where it is False (the unconditional rows of classifier-free guidance);
        RoPE is relative, so those rows behave exactly like an unconditioned LM."""
        B = emb.shape[0]
        h = self.embedding_adapter(emb.to(self.embedding_adapter.weight.dtype))[:, None]  # (B, 1, d)
        self.model(h, torch.zeros(B, 1, dtype=torch.long, device=h.device))
        if use_cond is not None:
            self.model.cache_visible[:, 0] = use_cond.to(self.model.cache_visible.device)


# -----------------------------------------------------------------------------
# checkpoints: our own .pt files, official safetensors, folders


class CheckpointError(Exception):
    """A checkpoint could not be found, read, or does not fit the model."""


_KEY_RE = re.compile(
    r"model\.(tok_embeddings\.weight|out_layer_norm\.(weight|bias)|encode_layers\.\d+\."
    r"(mixed_qkv|att_proj_linear|ff_gate_proj|ff_up_proj|ff_down_proj)\.weight|"
    r"encode_layers\.\d+\.norm[12]\.(weight|bias))|(lm_head|emb_head|class_head|embedding_adapter)\.weight")


def _normalize_keys(sd: dict) -> dict:
    # compiled models add `_orig_mod.`; accelerate/DDP wrappers add one leading
    # component (official convert_cp_from_safetensors strips it, SPEC B)
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    if not all(_KEY_RE.fullmatch(k) for k in sd):
        stripped = {k.split(".", 1)[-1]: v for k, v in sd.items()}
        if all(_KEY_RE.fullmatch(k) for k in stripped):
            return stripped
    return sd


def resolve_checkpoint(path) -> Path:
    """A file is returned as is. A folder gives ckpt.pt, else its newest *.pt,
    else model.safetensors, else its only *.safetensors."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if (p / "ckpt.pt").is_file():
        return p / "ckpt.pt"
    pts = sorted(p.glob("*.pt"), key=lambda f: (f.stat().st_mtime, f.name))
    if pts:
        return pts[-1]
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    sts = sorted(p.glob("*.safetensors"))
    if len(sts) == 1:
        return sts[0]
    what = f"{len(sts)} .safetensors files, none named model.safetensors" if sts else "no *.pt or *.safetensors"
    raise CheckpointError(f"{p}: cannot pick a checkpoint ({what})")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint file into a dict with at least "model" (a state dict).
    .pt files are read with torch.load(weights_only=True) only: no pickled code."""
    p = resolve_checkpoint(path)
    with open(p, "rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 0 < n < p.stat().st_size:  # safetensors: u64 header size + JSON
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{p}: reading .safetensors needs `pip install safetensors`") from None
        try:
            return {"model": load_file(str(p), device=str(map_location))}
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save zip / legacy pickle
        raise CheckpointError(f"{p}: not a checkpoint (neither safetensors nor a torch.save file)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a checkpoint (torch.load weights_only: {msg})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}  # a bare state dict
    raise CheckpointError(f"{p}: not a checkpoint (no 'model' state dict inside)")


def _config_for(p: Path, ckpt: dict, sd: dict, overrides: dict) -> ModelConfig:
    if isinstance(ckpt.get("config"), dict):
        cfg = ModelConfig.from_dict(ckpt["config"])
    elif p.with_suffix(".json").is_file() or (p.parent / "config.json").is_file():
        j = p.with_suffix(".json") if p.with_suffix(".json").is_file() else p.parent / "config.json"
        try:
            cfg = ModelConfig.from_dict(json.loads(j.read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{j}: not a model config ({e})") from None
    else:
        cfg = _infer_config(p, sd, overrides)
    return replace(cfg, **overrides)


def _infer_config(p: Path, sd: dict, overrides: dict) -> ModelConfig:
    if "model.tok_embeddings.weight" not in sd:
        raise CheckpointError(f"{p}: no model.tok_embeddings.weight, not an Aria checkpoint")
    vocab, d = sd["model.tok_embeddings.weight"].shape
    n_layers = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("model.encode_layers.")), default=-1)
    gate = sd.get("model.encode_layers.0.ff_gate_proj.weight")
    cfg = ModelConfig(
        d_model=d, n_heads=max(1, d // HEAD_DIM), n_layers=n_layers,
        ff_mult=gate.shape[0] // d if gate is not None else 4, vocab_size=vocab,
        class_size=sd["class_head.weight"].shape[0] if "class_head.weight" in sd else None,
        emb_size=(sd["emb_head.weight"].shape[0] if "emb_head.weight" in sd else
                  sd["embedding_adapter.weight"].shape[1] if "embedding_adapter.weight" in sd else None))
    if vocab != VOCAB_SIZE and overrides.get("vocab_size") != vocab:
        raise CheckpointError(f"{p}: vocabulary size {vocab}, expected {VOCAB_SIZE} (the tokenizer's)")
    if "n_heads" not in overrides:  # cannot be read from weights
        warnings.warn(f"{p}: no config found beside it; assuming {HEAD_DIM}-wide heads "
                      f"(n_heads={cfg.n_heads}). Pass n_heads=... if that is wrong.")
    return cfg


def _current_vocab_hash():
    try:
        import tokenizer
    except ImportError:
        return None
    return getattr(tokenizer, "VOCAB_HASH", None)


def load_model(path, device="cpu", dtype=torch.float32, strict=True, heads=None, **overrides) -> Aria:
    """Load an Aria model in eval mode from a .pt (ours), an official .safetensors,
    or a folder (see resolve_checkpoint). The architecture comes from the
    checkpoint's config, then X.json / config.json beside the file, then tensor
    shapes (64-wide heads). Heads are those present in the file, unless `heads`
    is given: then missing heads are freshly initialised and unrequested ones are
    dropped ("init from pretrained LM, replace head"). `overrides` change config
    fields (e.g. resid_dropout=0.2, grad_checkpoint=True, emb_size=512). The trunk
    is always loaded strictly; strict=False only tolerates unknown extra tensors."""
    p = resolve_checkpoint(path)
    ckpt = load_checkpoint(p, map_location="cpu")
    sd = _normalize_keys(ckpt["model"])
    cfg = _config_for(p, ckpt, sd, overrides)
    have = tuple(k for k in HEAD_ATTRS if f"{HEAD_ATTRS[k]}.weight" in sd)
    if heads is None:
        heads = tuple(sorted(have, key=lambda k: ("lm", "emb", "cls", "adapter").index(k)))
        if not any(h in OUTPUT_HEADS for h in heads):
            raise CheckpointError(f"{p}: no head tensors (lm_head/emb_head/class_head); pass heads=...")
    want_vh, got_vh = _current_vocab_hash(), ckpt.get("vocab_hash")
    if want_vh and got_vh and want_vh != got_vh:
        warnings.warn(f"{p}: saved with vocabulary hash {got_vh}, current tokenizer has {want_vh}; "
                      "token ids may mean different things")
    try:
        with torch.device("meta"):  # no time or memory wasted on an init we overwrite
            model = Aria(cfg, heads)
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"{p}: config does not make a model ({e})") from None
    expected = model.state_dict()
    fresh = [k for k in expected if k not in sd]
    missing = [k for k in fresh if not k.split(".")[0] in HEAD_ATTRS.values()]
    if missing:
        raise CheckpointError(f"{p}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    head_keys = {f"{a}.weight" for a in HEAD_ATTRS.values()}
    unexpected = [k for k in sd if k not in expected and k not in head_keys]
    if unexpected and strict:
        raise CheckpointError(f"{p}: unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for k, t in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(t.shape):
            what = " (vocabulary size)" if k in ("model.tok_embeddings.weight", "lm_head.weight") else ""
            raise CheckpointError(f"{p}: {k} has shape {tuple(sd[k].shape)}, "
                                  f"config expects {tuple(t.shape)}{what}")
    model.load_state_dict({k: sd[k] for k in expected if k in sd}, strict=False, assign=True)
    for k in fresh:  # requested heads the checkpoint lacks: real default init
        head = getattr(model, k.split(".")[0])
        head.to_empty(device="cpu")
        head.reset_parameters()
    model.model.rope.to_empty(device="cpu")  # rebuilds the RoPE tables off meta
    return model.to(device=device, dtype=dtype).eval()


def _unwrap(model) -> Aria:
    # torch.compile wraps in OptimizedModule (._orig_mod), DDP in .module
    while not isinstance(model, Aria):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"not an Aria model: {type(model).__name__}")
    return model


def _check_plain(obj, where="extra"):
    # resume must work with torch.load(weights_only=True); fail at save time, not at resume
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: {type(obj).__name__} cannot be read back with weights_only=True; "
                        "store plain Python values / tensors (e.g. vars(args), arr.tolist())")


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one


def save_checkpoint(path, model, **extra):
    """torch.save a plain dict {model, config, heads, vocab_hash, **extra} atomically.
    extra: optimizer/scheduler state dicts, step, rng tensors, vars(args), ..."""
    m = _unwrap(model)
    clash = {"model", "config", "heads", "vocab_hash"} & set(extra)
    if clash:
        raise ValueError(f"reserved checkpoint keys: {sorted(clash)}")
    _check_plain(extra)
    ckpt = {"model": {k.replace("_orig_mod.", ""): v for k, v in m.state_dict().items()},
            "config": asdict(m.config), "heads": list(m.heads), "vocab_hash": _current_vocab_hash(), **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(ckpt, f))


def export_safetensors(model, path, dtype=None):
    """Write the official layout (model.*, head keys) plus X.json with the official
    ModelConfig fields, loadable by the official code and by load_model."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise RuntimeError("export_safetensors needs `pip install safetensors`") from None
    m, path = _unwrap(model), Path(path)
    sd = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(save(sd, metadata={"format": "pt"})))
    cfg = {k: v for k, v in asdict(m.config).items() if v is not None}
    json_bytes = (json.dumps(cfg, indent=1) + "\n").encode()
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json_bytes))


# -----------------------------------------------------------------------------
# perf helpers for training scripts

# dense bf16 peak (no sparsity), matched as substrings of torch.cuda.get_device_name();
# more specific names first
GPU_PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(device_name) -> float | None:
    for key, flops in GPU_PEAK_BF16_FLOPS.items():
        if device_name and key.lower() in device_name.lower():
            return flops
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int, head_size: int | None = None) -> float:
    """Training FLOPs per token, PaLM/nanoGPT convention: 6N + 12*L*d*T.
    N = non-embedding parameters: everything but tok_embeddings (a lookup, no
    matmul); the output head (default: lm_head, vocab_size wide) is counted.
    12*L*d*T is QK^T and AV, forward + backward, without causal halving."""
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 3 * cfg.ff_mult * d * d + 4 * d
    n = L * per_layer + 2 * d + d * (head_size or cfg.vocab_size)
    return 6 * n + 12 * L * d * seq_len


def estimate_mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, device_name=None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None on CPU / unknown GPUs."""
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_token(cfg, seq_len) * tokens_per_s / peak


def configure_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5, device_type="cpu"):
    # official recipe (SPEC C.2): weight decay on *all* parameters, LayerNorm and
    # embeddings included. The paper does not say; we keep the official behaviour.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                             fused=device_type == "cuda")


# -----------------------------------------------------------------------------
# the training loop every stage script shares (pretrain, finetune_gen,
# finetune_contrastive, finetune_cls). A script builds its model, a function
# that yields micro-batches from a given step, and a loss; train() does the rest.
# Data order must be a pure function of the step (and seed), so resuming needs
# only the step: no loader state, and the same global batch for any world size.


def setup_distributed(device="auto"):
    """-> (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def lr_at(step, lr, warmup, total, final_frac=0.1):
    """Paper §4.1: linear warmup for `warmup` steps, then linear decay to final_frac*lr at
    `total` (final_frac 0.1 for pretraining, 0 to anneal to zero)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (1.0 - (1.0 - final_frac) * frac)


# the options every training script shares; each script passes its own defaults (with the
# paper section they come from) to add_train_args
TRAIN_OPTIONS = [
    ("out", str, "checkpoints (ckpt.pt) and log.jsonl go here"),
    ("batch_size", int, "sequences per process per micro-step"),
    ("grad_accum", int, "micro-steps per optimizer step"),
    ("lr", float, "peak learning rate"),
    ("warmup", int, "linear warmup steps"),
    ("final_lr_frac", float, "then linear decay to this fraction of lr"),
    ("weight_decay", float, "AdamW weight decay, on all parameters; betas (0.9, 0.95), eps 1e-5 (SPEC §C.2)"),
    ("grad_clip", float, "clip the gradient norm (0: off)"),
    ("epochs", float, "passes over the training data; sets max_iters"),
    ("max_iters", int, "optimizer steps (default: from --epochs)"),
    ("stop_at", int, "stop after this step without ending the schedule (split a run into jobs)"),
    ("eval_interval", int, "steps between evaluations (0: only at the end)"),
    ("log_interval", int, "steps per log line"),
    ("ckpt_interval", int, "steps between checkpoints (and one at the end)"),
    ("workers", int, "data loader worker processes"),
    ("compile", int, "torch.compile the model on CUDA (1/0)"),
    ("device", str, "cpu, cuda, mps or auto"),
    ("seed", int, "model init, data order and augmentation"),
]


def add_train_args(ap, **defaults):
    """Add the shared training options to an argparse parser; every default must be given."""
    for name, typ, help in TRAIN_OPTIONS:
        ap.add_argument(f"--{name}", type=typ, default=defaults.pop(name), help=help)
    ap.add_argument("--grad_checkpoint", action="store_true", help="recompute activations in backward to save memory")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    if defaults:
        raise TypeError(f"unknown training options {sorted(defaults)}")


def resume_args(args, parser, out):
    """With --resume, the hyperparameters saved in OUT's checkpoint come back; only the
    flags typed on this command line override them (e.g. a longer --max_iters)."""
    if not args.resume:
        return args
    ckpt_path = Path(out) / "ckpt.pt"
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: nothing to resume (no checkpoint in {out})")
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("args", {})
    given = {a.dest for a in parser._actions
             if any(s in sys.argv[1:] or any(x.startswith(s + "=") for x in sys.argv[1:]) for s in a.option_strings)}
    per_run = {"resume", "stop_at", "device", "workers"}  # how to run this job, not the run's settings
    for k, v in saved.items():
        if k not in given and k not in per_run and hasattr(args, k):
            setattr(args, k, v)
    return args


class StepSampler(torch.utils.data.Sampler):
    """This rank's sample indices from `step` on: micro-batch (step, micro) of rank r holds
    samples ((step * accum + micro) * world + r) * B + [0, B). The dataset maps an index g to
    its sample (epoch = g // len, shuffled by seed and epoch), so the global batch of a step
    does not depend on the number of processes, and resuming at a step needs nothing else."""

    def __init__(self, step, batch_size, accum, rank, world):
        self.step, self.b, self.a, self.r, self.w = step, batch_size, accum, rank, world

    def __iter__(self):
        step = self.step
        while True:
            for micro in range(self.a):
                base = ((step * self.a + micro) * self.w + self.r) * self.b
                yield from range(base, base + self.b)
            step += 1


def next_token_loss(model, batch):
    """Cross-entropy of the next token, <P> targets ignored. batch: (B, T+1) ids."""
    import tokenizer
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T)
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=tokenizer.PAD_ID)
    return loss, int((y != tokenizer.PAD_ID).sum())


def train(model, args, dataset, loss_fn, evaluate=None, tokens_per_micro=None, rank=0, world=1,
          device=torch.device("cpu"), seq_len=None):
    """The loop. args needs: out, batch_size, workers, lr, warmup, max_iters, final_lr_frac,
    weight_decay, grad_accum, grad_clip, log_interval, eval_interval, ckpt_interval, stop_at,
    compile, resume. dataset[g] is sample g (any g >= 0, see StepSampler); batches are built
    in `args.workers` loader processes. loss_fn(model, batch) -> (loss, n_target_tokens);
    evaluate(model) -> {name: value}. Writes OUT/ckpt.pt (atomic) and OUT/log.jsonl; only
    rank 0 prints and writes."""
    import contextlib
    import time
    import torch.distributed as dist
    out, master = Path(args.out), rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = configure_optimizer(model, args.lr, args.weight_decay, device_type=device.type)
    step = 0
    if args.resume:
        ckpt = load_checkpoint(out / "ckpt.pt")
        model.load_state_dict(_normalize_keys(ckpt["model"]))
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        if master:
            print(f"resuming from {out / 'ckpt.pt'} at step {step}")
    raw = model
    if device.type == "cuda" and args.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    log_file = open(out / "log.jsonl", "a") if master else None

    def log(rec, line):
        if master:
            print(line, flush=True)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    def save():
        if master:
            save_checkpoint(out / "ckpt.pt", raw, optimizer=opt.state_dict(), step=step, args=vars(args),
                            rng_cpu=torch.get_rng_state(),
                            **({"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))
        if world > 1:
            dist.barrier()

    def run_eval():
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), autocast:
            metrics = evaluate(raw)
        model.train()
        if not metrics:
            return
        log({"step": step, **metrics}, f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    stop = min(args.max_iters, args.stop_at or args.max_iters)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=StepSampler(step, args.batch_size, args.grad_accum, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0))  # iter(loader) must not draw from the restored global RNG
    it = iter(loader)
    model.train()
    t_last, t_start, step_start, step_last, tokens = time.time(), time.time(), step, step, 0
    while step < stop:
        lr = lr_at(step, args.lr, args.warmup, args.max_iters, args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            batch = _to(next(it), device)
            sync = micro == args.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss, n = loss_fn(model, batch)
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
            tokens += tokens_per_micro or n
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0 or step == stop:
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dt, n_steps = time.time() - t_last, step - step_last
            tok_s = tokens * world / dt
            mfu = estimate_mfu(raw.config, seq_len, tok_s) if device.type == "cuda" and seq_len else None
            eta = (stop - step) * (time.time() - t_start) / max(1, step - step_start)
            rec = {"step": step, "loss": round(loss_sum.item(), 6), "lr": lr, "ms": round(1e3 * dt / n_steps, 1),
                   "tok_s": round(tok_s), **({"mfu": round(mfu, 4)} if mfu else {})}
            log(rec, f"step {step:6d} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['ms']:.0f} ms/step | "
                     f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta:.0f}s")
            t_last, step_last, tokens = time.time(), step, 0
        if args.eval_interval and step % args.eval_interval == 0 and step < stop:
            run_eval()
        if args.ckpt_interval and step % args.ckpt_interval == 0 and step < stop:
            save()
    run_eval()
    save()
    if log_file:
        log_file.close()
    return raw


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(_to(b, device) for b in batch)
