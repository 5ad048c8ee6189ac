"""
Weight quantization for sampling (sample.py / bench.py / live.py --quantize): the blocks' linears
and the LM head of an Aria model (model.py) stored as int8, one scale per output channel, or int4,
a scale and offset per group of inputs, as gpt-fast does. Decoding one token streams every weight
once, so on a CPU the step time is the bytes read: 4x fewer at int8, 8x fewer at int4.

    import model as M, quantize as Q
    m = Q.quantize(M.load_model("model.safetensors"), "int4")     # in place; any checkpoint
    M.save_checkpoint("medium_int4.pt", m)                        # loads back quantized, no re-quantizing

Which kernel runs is chosen by measurement (README, Performance): on CPU, int8 goes through fbgemm's
dynamic int8 x int8 kernel (it also quantizes the activations, per row; VNNI) and int4 through
`_weight_int4pack_mm_for_cpu` (bf16 activations). Elsewhere (CUDA, MPS) a QLinear multiplies by its
dequantized weight, which torch.compile fuses (not yet measured on a GPU).
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cpu_has_vnni():
    try:  # without VNNI, fbgemm sums u8 x s8 pairs in int16, which saturates unless inputs use 7 bits
        with open("/proc/cpuinfo") as f:
            return any("vnni" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def _fbgemm_prepack(qweight, scale):
    """fbgemm's packed int8 weight, or None where torch has no fbgemm (ARM) or no longer has
    quantized tensors (deprecated in torch.ao; the kernel is still the fastest measured)."""
    if not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(qweight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
    except (AttributeError, RuntimeError):
        return None


VNNI = _cpu_has_vnni()


class QLinear(nn.Module):
    """A bias-free nn.Linear with its weight stored in int8 (a float32 scale per output channel)
    or int4 (two per byte; a bf16 scale and offset per `group_size` inputs: w = (q - 8) s + z,
    tinygemm's convention). dequantize() is its float twin. On CPU it runs the fastest stock
    kernels measured (README, Performance): int8 through fbgemm's dynamic int8 x int8 kernel,
    which quantizes the activations on the fly (each row to its own range; `_weight_int8pack_mm`,
    weight-only, on CPUs without fbgemm), int4 through `_weight_int4pack_mm_for_cpu` with bf16
    activations. Elsewhere the float twin's matmul, which torch.compile fuses with the dequantization."""

    def __init__(self, n_out, n_in, bits=8, group_size=64):
        super().__init__()
        if bits not in (4, 8) or bits == 4 and n_in % group_size:
            raise ValueError(f"int{bits} with groups of {group_size} does not fit {n_in} inputs")
        self.n_out, self.n_in, self.bits, self.group_size = n_out, n_in, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n_out, n_in, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(n_out, 1))
        else:
            rows = -(-n_out // 16) * 16  # the int4 kernel wants rows % 16 == 0 (the LM head has 17727)
            self.register_buffer("qweight", torch.zeros(rows, n_in // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(rows, n_in // group_size, dtype=torch.bfloat16))
            self.register_buffer("zero", torch.zeros(rows, n_in // group_size, dtype=torch.bfloat16))
        self._packed = None  # the CPU kernel's weight layout, made at the first CPU call

    @torch.no_grad()
    def quantize_(self, w):
        """Set the stored weight from a float (n_out, n_in) weight; round to nearest."""
        w = w.float()
        if self.bits == 8:
            s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            self.qweight.copy_(torch.round(w / s).clamp_(-127, 127))
            self.scale.copy_(s)
        else:
            w = F.pad(w, (0, 0, 0, self.qweight.shape[0] - w.shape[0])).unflatten(1, (-1, self.group_size))
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            s = ((hi - lo).clamp_min(1e-12) / 15).bfloat16().float()  # q from the rounded s, z: least error
            z = (lo + 8 * s).bfloat16().float()
            q = torch.round((w - z) / s + 8).clamp_(0, 15).to(torch.uint8).flatten(1)  # (rows, n_in)
            self.qweight.copy_(q[:, 0::2] | q[:, 1::2] << 4)
            self.scale.copy_(s[..., 0])
            self.zero.copy_(z[..., 0])
        self._packed = None
        return self

    def _int4(self):
        """(rows, n_in) values 0..15."""
        return torch.stack([self.qweight & 15, self.qweight >> 4], -1).flatten(1)

    def dequantize(self):
        """The float32 (n_out, n_in) weight this layer multiplies by."""
        if self.bits == 8:
            return self.qweight.float() * self.scale
        q = self._int4().float().unflatten(1, (-1, self.group_size))
        return ((q - 8) * self.scale[..., None].float() + self.zero[..., None].float()).flatten(1)[:self.n_out]

    def forward(self, x):
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize().to(x.dtype))
        x2 = x.reshape(-1, x.shape[-1]).float()  # (M, n_in)
        if self._packed is None:
            if self.bits == 4:
                sz = torch.stack([self.scale, self.zero], -1).transpose(0, 1).bfloat16().contiguous()  # (groups, rows, 2)
                self._packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._int4().int(), 1), sz)
            else:
                packed = _fbgemm_prepack(self.qweight, self.scale[:, 0].float())
                self._packed = self.scale[:, 0].bfloat16() if packed is None else packed
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), self._packed[0], self.group_size,
                                                           self._packed[1])[:, :self.n_out]
        elif torch.is_tensor(self._packed):  # no fbgemm: weight-only, bf16 activations
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.qweight, self._packed)
        elif x2.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, not VNNI)
        else:  # fbgemm quantizes the whole input to one range: scale the rows alike first
            r = x2.abs().amax(-1, keepdim=True).clamp_min_(1e-12)
            y = torch.ops.quantized.linear_dynamic(x2 / r, self._packed, not VNNI) * r
        return y.to(x.dtype).reshape(*x.shape[:-1], self.n_out)


QUANTIZED = ("mixed_qkv", "att_proj_linear", "ff_gate_proj", "ff_up_proj", "ff_down_proj")


def quantize(model, mode, group_size=64):
    """Replace the blocks' linears and the LM head by QLinear, in place; mode "int8" or "int4"
    ("none": unchanged). The embedding table (read one row per token) and the one-position
    emb/cls heads stay as they are. Returns the model (eval mode)."""
    if mode == "none":
        return model
    bits = {"int8": 8, "int4": 4}[mode]
    if getattr(model, "quantized", None):
        raise ValueError(f"the model is already quantized ({model.quantized['mode']})")
    layers = [(blk, name) for blk in model.model.encode_layers for name in QUANTIZED]
    layers += [(model, "lm_head")] if model.lm_head is not None else []
    for parent, name in layers:
        lin = getattr(parent, name)
        with torch.device(lin.weight.device):
            q = QLinear(lin.out_features, lin.in_features, bits, group_size)
        setattr(parent, name, q if lin.weight.is_meta else q.quantize_(lin.weight))
    model.quantized = {"mode": mode, "group_size": group_size}
    return model.eval()
