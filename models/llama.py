"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) reading and writing K/V via block tables.

Tokens of all sequences in a step are packed into one flat batch ([num_tokens, ...]);
the attention backend finds each sequence's context through `AttentionMetadata`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from twolane.kernels.attention import AttentionBackend, AttentionMetadata
from twolane.models.batch import ForwardHook
from twolane.models.config import ModelConfig, RopeScaling

KVCache = tuple[torch.Tensor, torch.Tensor]
# cos and sin at a step's positions, [num_tokens, 1, head_dim]: looked up once per step.
Rope = tuple[torch.Tensor, torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear without its random initialiser: the loader fills every weight, so the
    model is built straight on its device at the cost of an allocation (initialising
    135M parameters, or building on the meta device, costs seconds of every start)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without its random initialiser (see Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as the reference implementation does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama-3 long-context scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between the two cut-offs interpolated linearly in 1/wavelength.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_cutoff = old_len / scaling.low_freq_factor
    short_cutoff = old_len / scaling.high_freq_factor
    scaled = torch.where(wavelen > long_cutoff, inv_freq / scaling.factor, inv_freq)
    blend = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - blend) * scaled / scaling.factor + blend * scaled
    in_band = (wavelen >= short_cutoff) & (wavelen <= long_cutoff)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # buffers, [max_positions, head_dim]
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None
    ):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # [max_positions, head_dim]
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos and sin at `positions` in `dtype`: every layer of a step shares them."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )

    def forward(
        self, rope: Rope, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        # q, k and v share one matmul; the loader fills the three slices.
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.rotary = rotary

    def forward(
        self,
        rope: Rope,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rope, q, k)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        projected: torch.Tensor = self.o_proj(out.reshape(num_tokens, self.q_size))
        return projected


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        down: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return down


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        rope: Rope,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        hook: ForwardHook | None = None,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            rope, self.input_layernorm(hidden), kv_cache, meta, backend
        )
        if hook is not None:
            hook.safe_point()
        out: torch.Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return out


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling
        )
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        hook: ForwardHook | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """Run the decoder; `hook`, if given, is called at its safe points (ForwardHook)."""
        hidden: torch.Tensor = self.embed_tokens(input_ids)
        rope = self.first_layer.self_attn.rotary.tables(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, meta, backend, hook)
            if hook is not None:
                hook.safe_point()
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 for the rows that sample a token."""
        logits: torch.Tensor = self.lm_head(self.norm(hidden)).float()
        return logits

    @property
    def first_layer(self) -> DecoderLayer:
        """The first decoder layer, typed (an nn.ModuleList holds Modules)."""
        return cast(DecoderLayer, self.layers[0])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face named tensors into this module, fusing q/k/v and gate/up.

        Raises:
            ValueError: a tensor has no place here, or a parameter was never filled.
        """
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            target, shard = _map_hf_name(hf_name, self.first_layer)
            if target == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter")
            param = params[target]
            with torch.no_grad():
                dest = param.data if shard is None else param.data.narrow(0, *shard)
                if dest.shape != tensor.shape:
                    raise ValueError(
                        f"shape mismatch for {hf_name!r}: checkpoint {tuple(tensor.shape)}, "
                        f"model {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)
            filled.add(f"{target}#{shard}")
        expected = _expected_fills(self)
        missing = sorted(expected - filled)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def _map_hf_name(name: str, layer: DecoderLayer) -> tuple[str, tuple[int, int] | None]:
    """Map a checkpoint name to (parameter name, (row offset, rows) or None)."""
    name = name.removeprefix("model.")
    attn = layer.self_attn
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, attn.q_size),
        "self_attn.k_proj": ("self_attn.qkv_proj", attn.q_size, attn.kv_size),
        "self_attn.v_proj": ("self_attn.qkv_proj", attn.q_size + attn.kv_size, attn.kv_size),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, layer.mlp.intermediate_size),
        "mlp.up_proj": (
            "mlp.gate_up_proj",
            layer.mlp.intermediate_size,
            layer.mlp.intermediate_size,
        ),
    }
    for src, (dst, offset, rows) in fused.items():
        if f".{src}." in name:
            return name.replace(src, dst), (offset, rows)
    return name, None


def _expected_fills(model: LlamaForCausalLM) -> set[str]:
    expected: set[str] = set()
    for pname, _ in model.named_parameters():
        if pname == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        attn, mlp = model.first_layer.self_attn, model.first_layer.mlp
        if ".qkv_proj." in pname:
            for shard in (
                (0, attn.q_size),
                (attn.q_size, attn.kv_size),
                (attn.q_size + attn.kv_size, attn.kv_size),
            ):
                expected.add(f"{pname}#{shard}")
        elif ".gate_up_proj." in pname:
            for shard in (
                (0, mlp.intermediate_size),
                (mlp.intermediate_size, mlp.intermediate_size),
            ):
                expected.add(f"{pname}#{shard}")
        else:
            expected.add(f"{pname}#None")
    return expected
