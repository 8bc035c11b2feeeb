"""LLaDA2.0 / LLaDA2.1 (hub `model_type: llada2_moe`) as a transformers model of our own.

transformers has no class for this architecture, and the hub's modeling code was written for
transformers 4. The function it computes, read from its config fields:

* embeddings `model.word_embeddings`, then `num_hidden_layers` pre-norm blocks and a final
  RMSNorm `model.norm`, an untied (by default) `lm_head`; logits are not shifted (position i
  scores the token at i);
* attention: one fused projection `attention.query_key_value` whose rows are all query heads,
  then all key heads, then all value heads (grouped-query attention); an RMSNorm over each head
  of q and of k (`query_layernorm`, `key_layernorm`) before RoPE; RoPE on the first
  `int(head_dim * partial_rotary_factor)` dimensions of each head only, rotate-half over that
  part, the rest passed through; output projection `attention.dense`; no causal mask of its own
  (attention is bidirectional unless a mask says otherwise);
* MLP: SwiGLU. The first `first_k_dense_replace` layers are dense (`intermediate_size`); the
  others are mixtures of experts (`moe_intermediate_size` each) with `num_shared_experts`
  shared experts (one SwiGLU of width `moe_intermediate_size * num_shared_experts`) added to
  the routed output;
* router: sigmoid of `mlp.gate.weight @ x` (in float32 at least). The choice adds
  `mlp.gate.expert_bias` to the scores; the experts are grouped into `n_group` groups, a group
  scoring the sum of its two best biased scores, and only the `topk_group` best groups compete
  for the `num_experts_per_tok` experts. The weights are the unbiased scores of the chosen
  experts, renormalised to sum to one (when more than one is chosen) and multiplied by
  `routed_scaling_factor`.

RMSNorm, the router and RoPE run in float32 at least, as in the hub code, and in float64 for a
float64 model (the hub code would cast those parts to float32), so a float64 model computes the
function exactly. Module names equal the hub's weight names, so a hub checkpoint loads as it is.

The model takes what transformers' own decoders take: a 2D padding mask (bidirectional, or
causal when `config.is_causal` is True), a 4D mask `[B, 1, Q, K]` used as given (bool, True =
may attend, or additive), `position_ids`, and a `DynamicCache` (`cache`, or its older name
`past_key_values`) holding the keys and values of earlier positions, which each call extends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MODEL_TYPE = "agrpo_llada2_moe"


class LLaDA2Config(PretrainedConfig):
    """The hub's LLaDA2MoeConfig fields, with its defaults.

    Fields of a hub config.json that the model does not read (`score_function`, `router_dtype`,
    `use_rmsnorm`, dropouts other than attention ...) are kept as plain attributes; the family
    loader refuses values the model cannot reproduce.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    use_cache: bool = True
    num_experts: int | None = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    is_causal: bool = False
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rotary = getattr(self, "rotary_dim", None)
        if rotary is not None and int(rotary) != self.rope_dim:
            raise ValueError(
                f"rotary_dim={rotary} differs from head_dim * partial_rotary_factor = {self.rope_dim}, "
                "which is what the model rotates"
            )
        if self.rope_dim % 2:
            raise ValueError(f"the rotary part of each head ({self.rope_dim} dimensions) must be even")
        if self.num_experts:
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} is not a multiple of n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} is more than the {self.topk_group} kept "
                    f"groups of {self.num_experts // self.n_group} experts hold"
                )

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and float32, float64 for float64 (the hub code's casts, widened)."""
    return torch.promote_types(dtype, torch.float32)


class LLaDA2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(_compute_dtype(hidden.dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LLaDA2RotaryEmbedding(nn.Module):
    """cos / sin of RoPE for the rotary part of each head, recomputed from the config per call
    (a few numbers) in float64, so the angles stay exact in any parameter dtype."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.dim = config.rope_dim
        self.base = float(config.rope_theta)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        exact = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, device=device, dtype=exact) / self.dim)
        angles = position_ids.to(exact)[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `cos.shape[-1]` dimensions of each head of x [B, heads, L, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, heads, length, dim = x.shape
    return x[:, :, None].expand(b, heads, groups, length, dim).reshape(b, heads * groups, length, dim)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention; takes a bool mask (True = may attend) or an additive one."""
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=_compute_dtype(query.dtype)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LLaDA2Attention(nn.Module):
    def __init__(self, config: LLaDA2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # a causal mask, when wanted, is always passed explicitly
        width = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=config.use_qkv_bias)
        self.query_layernorm = LLaDA2RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = LLaDA2RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden, position_embeddings, attention_mask=None, cache: Cache | None = None, **kwargs):
        bsz, length, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(bsz, length, -1, self.head_dim)
        query, key, value = qkv.split([self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=2)
        query = self.query_layernorm(query).transpose(1, 2)
        key = self.key_layernorm(key).transpose(1, 2)
        value = value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_partial_rotary(query, cos, sin), apply_partial_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attend(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.dense(out.reshape(bsz, length, -1).contiguous())


class LLaDA2MLP(nn.Module):
    def __init__(self, config: LLaDA2Config, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2Router(nn.Module):
    """Sigmoid router with a selection-only bias and group-limited top-k (see the module docstring)."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # adjusted outside of gradient descent (auxiliary-loss-free load balancing): a buffer
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def choose(self, biased: torch.Tensor) -> torch.Tensor:
        """[T, E] biased scores -> [T, top_k] expert ids, best first, within the best groups."""
        tokens, experts = biased.shape
        grouped = biased.view(tokens, self.n_group, experts // self.n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        kept = group_score.topk(self.topk_group, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        allowed = allowed.repeat_interleave(experts // self.n_group, dim=1)
        return biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids [T, k], weights [T, k] in float32 at least)."""
        dtype = _compute_dtype(x.dtype)
        scores = torch.sigmoid(F.linear(x.to(dtype), self.weight.to(dtype)))
        chosen = self.choose(scores + self.expert_bias.to(dtype))
        weights = scores.gather(1, chosen)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling


class LLaDA2SparseMoe(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.experts = nn.ModuleList(LLaDA2MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.gate = LLaDA2Router(config)
        self.shared_experts = None
        if config.num_shared_experts is not None:
            self.shared_experts = LLaDA2MLP(config, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        chosen, weights = self.gate(x)
        top_k = chosen.shape[1]
        # every (token, slot) pair sorted by expert, each expert run once on its tokens
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = x[order // top_k]
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts):
            if count:
                outputs.append(expert(tokens[start:start + count]))
                start += count
        routed = torch.cat(outputs)[order.argsort()].view(-1, top_k, shape[-1])
        out = (routed.to(weights.dtype) * weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class LLaDA2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2Config, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2Attention(config, layer_idx)
        moe = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = LLaDA2SparseMoe(config) if moe else LLaDA2MLP(config, config.intermediate_size)
        self.input_layernorm = LLaDA2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, attention_mask=None, position_embeddings=None, cache: Cache | None = None, **kwargs):
        hidden = hidden + self.attention(
            self.input_layernorm(hidden), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LLaDA2PreTrainedModel(PreTrainedModel):
    config_class = LLaDA2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2DecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDA2Router):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.expert_bias)


def _cache_argument(cache, past_key_values):
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the key/value cache once, as `cache` (or its older name `past_key_values`)")
    return cache if cache is not None else past_key_values


class LLaDA2Model(LLaDA2PreTrainedModel):
    def __init__(self, config: LLaDA2Config):
        super().__init__(config)
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDA2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def _mask(self, attention_mask, inputs_embeds, cache, position_ids):
        if attention_mask is None and not getattr(self.config, "is_causal", False):
            return None  # attention over every position
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        return create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, allow_is_causal_skip=False,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hidden states [B, L, H] after the final norm; `cache` (a DynamicCache) gains this call's keys/values."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _cache_argument(cache, past_key_values)
        for unused in ("return_dict", "output_attentions", "output_hidden_states", "cache_position"):
            kwargs.pop(unused, None)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = self._mask(attention_mask, inputs_embeds, cache, position_ids)
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None)


class LLaDA2ForCausalLM(LLaDA2PreTrainedModel):
    """LLaDA2.0 with its LM head. Logits are not shifted: position i scores the token at i."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2Config):
        super().__init__(config)
        self.model = LLaDA2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, L, V]; with `labels`, the cross-entropy at the same positions (-100 ignored)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels[:, -logits.shape[1]:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


# AutoConfig / AutoModelForCausalLM read checkpoints saved by save_pretrained once this module is imported
AutoConfig.register(MODEL_TYPE, LLaDA2Config, exist_ok=True)
AutoModel.register(LLaDA2Config, LLaDA2Model, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2Config, LLaDA2ForCausalLM, exist_ok=True)
