"""SDAR and LLaDA2.0 hub checkpoints through the native loader, under block attention.

The fixtures (../shared/fixtures/models/{sdar,llada2}) hold tiny checkpoints in each family's hub
format and the float64 logits of the family's own code under the block-causal mask. Besides
them, each family gets a second, differently sized random checkpoint written in its hub layout
by `save_in_family_format`, checked against a slow float64 implementation written here from the
hub files alone (config.json and the weights under their hub names).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import DynamicCache

from agrpo import blocks, families
from agrpo.errors import AgrpoError
from agrpo.models import load_model_and_tokenizer, load_tokenizer, shift_logits_of
from agrpo.policy import Policy

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "models"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="model fixtures not available")

FAMILIES = ("sdar", "llada2")
CLASSES = {"sdar": "Qwen3ForCausalLM", "llada2": "LLaDA2ForCausalLM"}
END_OF_TURN = {"sdar": "<|im_end|>", "llada2": "<|role_end|>"}
MASK, EOS, EOT = 1020, 1021, 1022
REL_TOL_F32 = 1e-5


def word_tokenizer(family: str, vocab_size: int = 1024, mask: int = MASK, eos: int = EOS, eot: int = EOT):
    """A word-level tokenizer `<t0> <t1> ...` whose special ids are the checkpoint's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<|mask|>": mask, "<|endoftext|>": eos, END_OF_TURN[family]: eot, "<unk>": vocab_size - 1}
    vocab = {f"<t{i}>": i for i in range(vocab_size) if i not in specials.values()}
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, mask_token="<|mask|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [END_OF_TURN[family]]})
    return tok


def fixture_copy(family: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / family, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    word_tokenizer(family).save_pretrained(dest)
    return dest


def reference(family: str) -> dict:
    return load_file(str(FIXTURES / family / "reference.safetensors"))


def fixture_block_size(family: str) -> int:
    info = json.loads((FIXTURES / family / "reference.json").read_text())
    return int(info.get("block_size") or info["block_length"])


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    family = request.param
    path = fixture_copy(family, tmp_path_factory.mktemp(family) / family)
    # LLaDA2's block length is an argument of its generate, not a config field: given here
    size = fixture_block_size(family) if family == "llada2" else None
    model, tok = load_model_and_tokenizer(str(path), dtype="float32", block_size=size)
    return family, path, model.eval(), tok


def rel_error(logits, ref, attention_mask) -> float:
    """max |difference| / max |reference| over the positions with attention mask 1."""
    real = attention_mask.bool()
    return float((logits.double() - ref).abs().amax(-1)[real].max() / ref[real].abs().max())


def all_positions(ids):
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def as_float64(model):
    """A float64 copy (the float32 model stays as it is for the other tests)."""
    import copy

    return copy.deepcopy(model).double().eval()


# -- the mask --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_block_mask_and_positions_are_the_fixtures(family):
    ref = reference(family)
    attn = ref["attention_mask"]
    mask = blocks.block_attention_mask(attn, fixture_block_size(family))
    assert mask.dtype == torch.bool and torch.equal(mask, ref["block_attention_mask"])
    real = attn.bool()
    assert torch.equal(blocks.position_ids(attn)[real], ref["position_ids"][real])


def test_block_mask_by_hand():
    """Blocks count from position 0 of the sequence as given; padding keys are never seen."""
    size = 3
    alone = blocks.block_attention_mask(torch.ones(1, 7, dtype=torch.long), size)[0, 0]
    # tokens 0-2 form block 0, 3-5 block 1, 6 block 2
    assert alone[0].tolist() == [True] * 3 + [False] * 4
    assert alone[4].tolist() == [True] * 6 + [False]
    assert alone[6].all()
    # left padding by a whole block: the row's blocks are those it has without padding
    whole = blocks.block_attention_mask(torch.tensor([[0, 0, 0] + [1] * 7]), size)[0, 0]
    assert torch.equal(whole[3:, 3:], alone) and not whole[3:, :3].any()
    # by part of a block: the grid stays where it is, the first block holds one real token
    part = blocks.block_attention_mask(torch.tensor([[0, 0] + [1] * 7]), size)[0, 0]
    assert part[2].tolist() == [False, False, True] + [False] * 6
    assert part[3].tolist() == [False, False] + [True] * 4 + [False] * 3
    assert torch.equal(part[:2], torch.eye(9, dtype=torch.bool)[:2])  # a padding query sees itself only
    assert torch.equal(blocks.block_attention_mask(torch.tensor([[0, 0] + [1] * 7]), size, start=5), part[None, None, 5:])
    assert blocks.position_ids(torch.tensor([[0, 0] + [1] * 7])).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6]]
    ends = blocks.cache_ends_on_blocks(torch.tensor([[0, 0, 0, 0, 0] + [1] * 4, [1] * 9]), size, 4)
    assert ends.tolist() == [True, False]  # position 4 shares its block with padding only in row 0


def test_flash_attention_cannot_take_a_block_mask():
    mask = blocks.block_attention_mask(torch.ones(1, 4, dtype=torch.long), 2)
    assert blocks.for_attention(mask, "sdpa", torch.float32) is mask
    additive = blocks.for_attention(mask, "eager", torch.float32)
    assert torch.equal(additive == 0, mask)
    with pytest.raises(AgrpoError, match="attn_implementation=sdpa"):
        blocks.for_attention(mask, "flash_attention_2", torch.float16)


# -- the function the families' own code computes ----------------------------------------------
def test_logits_match_the_family_reference(loaded):
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    assert not bool(attn[2].all()) and bool(attn[:2].all())  # row 2 is the left-padded one
    policy = Policy(model)
    assert policy.block_size == fixture_block_size(family)
    with torch.no_grad():
        got = policy(ids, all_positions(ids), attn)
    assert policy._backbone is not None  # the gathered head kept its one-time check
    errors = [rel_error(got[b:b + 1], ref["logits"][b:b + 1], attn[b:b + 1]) for b in range(3)]
    print(f"{family} float32 relative error per row: {errors}")
    assert max(errors) <= REL_TOL_F32, errors
    # the model's own forward with the fixture's mask and positions is the same function
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=ref["block_attention_mask"], position_ids=ref["position_ids"]).logits
    assert rel_error(own, ref["logits"], attn) <= REL_TOL_F32


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_gets_the_mask_it_adds(family, tmp_path):
    """Eager attention adds the mask to the scores: Policy hands it 0 / minimum, not True / False."""
    path = fixture_copy(family, tmp_path / family)
    model, _ = load_model_and_tokenizer(str(path), dtype="float32", block_size=4, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        got = Policy(model.eval())(ids, all_positions(ids), attn)
    assert rel_error(got, ref["logits"], attn) <= REL_TOL_F32


def test_float64_is_exact_where_the_implementation_is(loaded):
    """LLaDA2 (our class) runs its float32 casts in float64 for a float64 model: exact. SDAR runs on
    transformers' Qwen3, whose RMSNorm and RoPE compute in float32 whatever the dtype: ~1e-7."""
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        got = Policy(as_float64(model))(ids, all_positions(ids), attn)
    assert got.dtype == torch.float64
    errors = [rel_error(got[b:b + 1], ref["logits"][b:b + 1], attn[b:b + 1]) for b in range(3)]
    print(f"{family} float64 relative error per row: {errors}")
    assert max(errors) <= (1e-12 if family == "llada2" else 1e-6), errors


def test_llada2_without_a_mask_attends_everywhere(loaded):
    family, _, model, _ = loaded
    if family != "llada2":
        pytest.skip("SDAR's own code has no mask-free mode to compare with")
    ref = reference(family)
    ids = ref["input_ids"][:2]
    full = ref["logits_full_bidirectional"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
        exact = as_float64(model)(input_ids=ids).logits
    ones = torch.ones_like(ids)
    assert rel_error(got, full, ones) <= REL_TOL_F32
    assert rel_error(exact, full, ones) <= 1e-12
    # the block mask matters: the block logits are another function
    assert rel_error(full, ref["logits"][:2], ones) > 1e-2


def test_config_carries_the_family_facts(loaded):
    family, _, model, tok = loaded
    config = model.config
    assert type(model).__name__ == CLASSES[family]
    assert config.agrpo_family["name"] == family and config.is_causal is False
    assert config.block_size == 4 and config.mask_token_id == MASK
    assert config.eos_token_id == [EOS, EOT]  # EOS first, then the end of turn
    assert shift_logits_of(model) is False
    assert tok.padding_side == "left"
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2 and config.head_dim == 16
    if family == "sdar":
        assert config.rope_parameters["rope_theta"] == 1000000
        assert config.layer_types == ["full_attention"] * 2  # no sliding window
        assert config._attn_implementation == "sdpa"  # not the flex attention SDAR's config asks for
    else:
        assert config.rope_dim == 8 and config.num_experts == 8 and config.n_group == 4
        assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["LLaDA2MLP", "LLaDA2SparseMoe", "LLaDA2SparseMoe"]


def test_block_size_defaults_and_overrides(tmp_path):
    path = fixture_copy("llada2", tmp_path / "llada2")
    model, _ = load_model_and_tokenizer(str(path), dtype="float32")
    assert model.config.block_size == 32  # LLaDA2.0's generate default
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "block_size": 8}))
    model, _ = load_model_and_tokenizer(str(path), dtype="float32")
    assert model.config.block_size == 8 and Policy(model).block_size == 8
    with pytest.raises(AgrpoError, match="block_size must be a positive"):
        load_model_and_tokenizer(str(path), dtype="float32", block_size=0)


# -- the cached path a block sampler uses ---------------------------------------------------
def cached_run(policy, ids, attn, cuts):
    """Logits of `ids` computed chunk by chunk: each chunk run once against the cache without
    storing it (the denoising call), then stored (the commit). Returns the logits and the cache."""
    cache, pieces, start = DynamicCache(), [], 0
    for end in cuts:
        before = cache.get_seq_length()
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        pieces.append(policy.chunk_logits(ids[:, start:end], attn[:, :end], cache))
        assert cache.get_seq_length() == before  # not stored: the cache is as it was
        assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(cache.layers, kept))
        again = policy.chunk_logits(ids[:, start:end], attn[:, :end], cache, store=True)
        assert torch.equal(again, pieces[-1])
        assert cache.get_seq_length() == end
        start = end
    return torch.cat(pieces, 1), cache


def test_cached_chunks_equal_the_block_masked_forward(loaded):
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    for dtype_model, tol in ((model, 1e-5), (as_float64(model), 1e-12 if family == "llada2" else 1e-6)):
        policy = Policy(dtype_model)
        with torch.no_grad():
            full = policy(ids, all_positions(ids), attn)
            # the prompt's whole blocks, then one block, then two blocks at once
            chunked, _ = cached_run(policy, ids, attn, [8, 12, 16, 24])
        print(f"{family} {full.dtype} cached vs full: {rel_error(chunked, full.double(), attn):.2e}")
        assert rel_error(chunked, full.double(), attn) <= tol
        assert rel_error(chunked, ref["logits"], attn) <= (REL_TOL_F32 if full.dtype == torch.float32 else tol)


def test_cache_with_left_padding(loaded):
    """A row left-padded by part of a block keeps the sequence's grid; padded by whole blocks it
    computes what it computes without its padding. The cache ends on the grid."""
    family, _, model, _ = loaded
    ref = reference(family)
    size = model.config.block_size
    real = ref["input_ids"][1:2]
    policy = Policy(as_float64(model))
    for pad in (3, size):
        padded = torch.cat([torch.full((1, pad), EOS), real], 1)
        attn = (torch.arange(padded.shape[1]) >= pad).long()[None]
        with torch.no_grad():
            full = policy(padded, all_positions(padded), attn)
            chunked, _ = cached_run(policy, padded, attn, [size, 3 * size, 4 * size, padded.shape[1]])
        assert rel_error(chunked, full.double(), attn) <= 1e-6
        if pad == size:
            with torch.no_grad():
                alone = policy(real, all_positions(real), None)
            assert rel_error(full[:, pad:], alone, torch.ones_like(real)) <= 1e-6
    with pytest.raises(AgrpoError, match="ends inside a block"):
        cache = DynamicCache()
        policy.chunk_logits(padded[:, :size + 2], attn[:, :size + 2], cache, store=True)
        policy.chunk_logits(padded[:, size + 2:2 * size], attn[:, :2 * size], cache)


def test_cached_path_refusals(loaded):
    family, _, model, _ = loaded
    policy = Policy(model)
    ids = reference(family)["input_ids"]
    cache = DynamicCache()
    with pytest.raises(AgrpoError, match="expected shape"):
        policy.chunk_logits(ids[:, :4], torch.ones(3, 5, dtype=torch.long), cache)
    from conftest import tiny_model

    with pytest.raises(AgrpoError, match="block-diffusion model"):
        Policy(tiny_model(0)).chunk_logits(ids[:, :4] % 40, None, cache)


# -- back to the hub's layout ----------------------------------------------------------------
def safetensors_layout(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "reference.safetensors":
            with safe_open(str(f), "pt") as s:
                out.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
    return out


def test_hub_layout_round_trip(loaded, tmp_path):
    family, path, model, tok = loaded
    out = families.save_in_family_format(model, tok, tmp_path / "hub")
    assert safetensors_layout(out) == safetensors_layout(FIXTURES / family)
    assert set(safetensors_layout(out)) == expected_hub_names(family, json.loads((FIXTURES / family / "config.json").read_text()))
    original = json.loads((FIXTURES / family / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert set(written) == set(original)
    assert {k: v for k, v in written.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in original.items() if k not in ("dtype", "torch_dtype")}
    size = model.config.block_size
    reloaded, _ = load_model_and_tokenizer(str(out), dtype="float32", block_size=size if family == "llada2" else None)
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        assert torch.equal(Policy(reloaded)(ids, all_positions(ids), attn), Policy(model)(ids, all_positions(ids), attn))


def test_native_checkpoint_keeps_the_family_and_block_size(loaded, tmp_path):
    family, _, model, tok = loaded
    model.save_pretrained(tmp_path / "native")
    tok.save_pretrained(tmp_path / "native")
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "native"), dtype="float32")
    assert type(reloaded).__name__ == CLASSES[family]
    assert reloaded.config.block_size == 4 and reloaded.config.agrpo_family["name"] == family
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        assert torch.equal(Policy(reloaded)(ids, all_positions(ids), attn), Policy(model)(ids, all_positions(ids), attn))
    families.save_in_family_format(reloaded, None, tmp_path / "hub")  # the hub config travels along
    assert safetensors_layout(tmp_path / "hub") == safetensors_layout(FIXTURES / family)


# -- a second, differently sized checkpoint -------------------------------------------------------
SECOND = {
    "sdar": {"hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 3, "num_attention_heads": 6,
             "num_key_value_heads": 2, "head_dim": 10, "vocab_size": 200, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True, "block_size": 3, "mask_token_id": 196, "eos_token_id": 197,
             "bos_token_id": 197, "max_window_layers": 3},
    "llada2": {"hidden_size": 40, "intermediate_size": 56, "num_hidden_layers": 4, "first_k_dense_replace": 2,
               "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16, "partial_rotary_factor": 0.25,
               "rotary_dim": 4, "num_experts": 12, "n_group": 3, "topk_group": 2, "num_experts_per_tok": 3,
               "num_shared_experts": 2, "moe_intermediate_size": 20, "routed_scaling_factor": 1.7, "vocab_size": 200,
               "rope_theta": 20000, "rms_norm_eps": 1e-5, "use_qkv_bias": True, "use_bias": True, "pad_token_id": 197,
               "block_size": 6, "max_window_layers": 4},
}


def second_checkpoint(family: str, dest: Path):
    """A random model of another size, written in the hub layout: (path, the model, its tokenizer)."""
    hub = {**json.loads((FIXTURES / family / "config.json").read_text()), **SECOND[family]}
    family_record = families.FAMILIES[family]
    config = families.native_config(family_record, hub)
    tok = word_tokenizer(family, vocab_size=200, mask=196, eos=197, eot=198)
    torch.manual_seed(7)
    model = families.native_model_class(family_record)(config)
    with torch.no_grad():  # weights far from their initialisation: norms around 1, a routing that matters
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.25 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    families.annotate(config, family_record, tok, hub=hub)
    return families.save_in_family_format(model.eval(), tok, dest), model, tok


def expected_hub_names(family: str, c: dict) -> set:
    """Every weight name of the hub checkpoint, from the module layout of the family's own code."""
    names = {"model.norm.weight"} | (set() if c["tie_word_embeddings"] else {"lm_head.weight"})
    mlp = {f"{p}_proj.weight" for p in ("gate", "up", "down")}
    for i in range(c["num_hidden_layers"]):
        layer = {"input_layernorm.weight", "post_attention_layernorm.weight"}
        if family == "sdar":
            names.add("model.embed_tokens.weight")
            layer |= {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
            layer |= {f"self_attn.{p}_proj.bias" for p in "qkvo"} if c["attention_bias"] else set()
            layer |= {f"mlp.{n}" for n in mlp}
        else:
            names.add("model.word_embeddings.weight")
            layer |= {"attention.query_key_value.weight", "attention.dense.weight", "attention.query_layernorm.weight",
                      "attention.key_layernorm.weight"}
            layer |= {"attention.query_key_value.bias"} if c["use_qkv_bias"] else set()
            layer |= {"attention.dense.bias"} if c["use_bias"] else set()
            if i < c["first_k_dense_replace"]:
                layer |= {f"mlp.{n}" for n in mlp}
            else:
                layer |= {"mlp.gate.weight", "mlp.gate.expert_bias"} | {f"mlp.shared_experts.{n}" for n in mlp}
                layer |= {f"mlp.experts.{e}.{n}" for e in range(c["num_experts"]) for n in mlp}
        names |= {f"model.layers.{i}.{n}" for n in layer}
    return names


def hub_weights(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(str(f)).items()})
    return out


def by_hand_mask(attn: torch.Tensor, size: int) -> torch.Tensor:
    """[B, L, L] block mask, one entry at a time (the definition, without blocks.py)."""
    bsz, length = attn.shape
    out = torch.zeros(bsz, length, length, dtype=torch.bool)
    for b in range(bsz):
        for q in range(length):
            for k in range(length):
                out[b, q, k] = bool(attn[b, k]) and k // size <= q // size if attn[b, q] else q == k
    return out


def rmsnorm(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, positions, dim, theta):
    """RoPE over the first `dim` of each head of x [L, heads, head_dim]: dimension i pairs with i + dim / 2."""
    half = dim // 2
    angle = positions.double()[:, None] * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., :half], x[..., half:dim]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., dim:]], -1)


def attention(q, k, v, mask, heads, kv_heads):
    """q [L, heads, d], k/v [L, kv_heads, d], mask [L, L] -> [L, heads * d]."""
    out = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = q[:, h] @ k[:, g].T / q.shape[-1] ** 0.5
        out.append(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v[:, g])
    return torch.cat(out, -1)


def swiglu(x, w, prefix):
    return (torch.nn.functional.silu(x @ w[f"{prefix}.gate_proj.weight"].T) * (x @ w[f"{prefix}.up_proj.weight"].T)) @ w[
        f"{prefix}.down_proj.weight"].T


def linear(x, w, name):
    y = x @ w[f"{name}.weight"].T
    return y + w[f"{name}.bias"] if f"{name}.bias" in w else y


def route(x, w, prefix, c):
    """One token's MoE output, the router read from the description in agrpo.modeling_llada2."""
    scores = torch.sigmoid(w[f"{prefix}.gate.weight"] @ x)
    biased = scores + w[f"{prefix}.gate.expert_bias"]
    per = c["num_experts"] // c["n_group"]
    group_score = [sorted(biased[g * per:(g + 1) * per].tolist())[-2:] for g in range(c["n_group"])]
    kept = sorted(range(c["n_group"]), key=lambda g: -sum(group_score[g]))[:c["topk_group"]]
    candidates = [e for e in range(c["num_experts"]) if e // per in kept]
    chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:c["num_experts_per_tok"]]
    weights = scores[chosen] / scores[chosen].sum() * c["routed_scaling_factor"]
    out = sum(wt * swiglu(x, w, f"{prefix}.experts.{e}") for wt, e in zip(weights, chosen))
    return out + swiglu(x, w, f"{prefix}.shared_experts")


def reference_logits(family: str, path: Path, ids: torch.Tensor, attn: torch.Tensor, size: int) -> torch.Tensor:
    """Float64 logits from the hub files alone."""
    c = json.loads((path / "config.json").read_text())
    w = hub_weights(path)
    heads, kv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    rot = int(hd * c.get("partial_rotary_factor", 1.0))
    mask = by_hand_mask(attn, size)
    embed = w["model.embed_tokens.weight" if family == "sdar" else "model.word_embeddings.weight"]
    head = embed if c["tie_word_embeddings"] else w["lm_head.weight"]
    out = []
    for b in range(ids.shape[0]):
        positions = (attn[b].cumsum(0) - 1).clamp(min=0)
        h = embed[ids[b]]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            x = rmsnorm(h, w[f"{p}.input_layernorm.weight"], eps)
            if family == "sdar":
                q = linear(x, w, f"{p}.self_attn.q_proj").view(-1, heads, hd)
                k = linear(x, w, f"{p}.self_attn.k_proj").view(-1, kv, hd)
                v = linear(x, w, f"{p}.self_attn.v_proj").view(-1, kv, hd)
                q, k = rmsnorm(q, w[f"{p}.self_attn.q_norm.weight"], eps), rmsnorm(k, w[f"{p}.self_attn.k_norm.weight"], eps)
                o = f"{p}.self_attn.o_proj"
            else:
                qkv = linear(x, w, f"{p}.attention.query_key_value").view(-1, heads + 2 * kv, hd)
                q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv], qkv[:, heads + kv:]
                q = rmsnorm(q, w[f"{p}.attention.query_layernorm.weight"], eps)
                k = rmsnorm(k, w[f"{p}.attention.key_layernorm.weight"], eps)
                o = f"{p}.attention.dense"
            q, k = rope(q, positions, rot, c["rope_theta"]), rope(k, positions, rot, c["rope_theta"])
            h = h + linear(attention(q, k, v, mask[b], heads, kv), w, o)
            x = rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
            if family == "llada2" and i >= c["first_k_dense_replace"]:
                h = h + torch.stack([route(t, w, f"{p}.mlp", c) for t in x])
            else:
                h = h + swiglu(x, w, f"{p}.mlp")
        out.append(rmsnorm(h, w["model.norm.weight"], eps) @ head.T)
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_differently_sized_checkpoint_round_trips_and_computes_the_function(family, tmp_path):
    path, model, _ = second_checkpoint(family, tmp_path / "hub")
    written = json.loads((path / "config.json").read_text())
    assert {k: written[k] for k in SECOND[family]} == SECOND[family]
    assert written["model_type"] == {"sdar": "sdar", "llada2": "llada2_moe"}[family]
    assert set(safetensors_layout(path)) == expected_hub_names(family, written)
    loaded, _ = load_model_and_tokenizer(str(path), dtype="float32")
    assert loaded.config.block_size == SECOND[family]["block_size"] and loaded.config.mask_token_id == 196
    assert loaded.config.eos_token_id == [197, 198]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 196, (2, 17), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0  # left padding by part of a block
    ids[1, :2] = 197
    with torch.no_grad():
        got = Policy(loaded)(ids, all_positions(ids), attn)
        assert torch.equal(got, Policy(model)(ids, all_positions(ids), attn))
        exact = Policy(as_float64(loaded))(ids, all_positions(ids), attn)
    expected = reference_logits(family, path, ids, attn, SECOND[family]["block_size"])
    error = rel_error(exact, expected, attn)
    print(f"{family} second checkpoint, float64 vs the slow reference: {error:.2e}")
    assert error <= (1e-12 if family == "llada2" else 1e-6)
    with torch.no_grad():
        size = SECOND[family]["block_size"]
        chunked, _ = cached_run(Policy(as_float64(loaded)), ids[:1], attn[:1], [size, 2 * size, ids.shape[1]])
    assert rel_error(chunked, exact[:1].double(), attn[:1]) <= (1e-12 if family == "llada2" else 1e-6)


def test_llada2_trains_through_its_router_and_experts(loaded):
    family, _, model, _ = loaded
    if family != "llada2":
        pytest.skip("LLaDA2 only: its MoE is agrpo's code")
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    model.train()
    try:
        logits = Policy(model)(ids, all_positions(ids)[:, -4:], attn)
        logits.logsumexp(-1).sum().backward()
    finally:
        model.eval()
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.shared_experts.up_proj.weight.grad.abs().sum() > 0
    assert sum(int(e.up_proj.weight.grad is not None and e.up_proj.weight.grad.abs().sum() > 0) for e in moe.experts) >= 2
    model.zero_grad(set_to_none=True)


def test_llada2_lora_with_activation_checkpointing(tmp_path):
    path = fixture_copy("llada2", tmp_path / "llada2")
    lora = {"r": 2, "alpha": 4, "target_modules": ["query_key_value", "dense", "gate_proj"]}
    model, _ = load_model_and_tokenizer(str(path), dtype="float32", block_size=4, lora=lora, gradient_checkpointing=True)
    ref = reference("llada2")
    ids, attn = ref["input_ids"], ref["attention_mask"]
    model.train()
    Policy(model)(ids, all_positions(ids)[:, -4:], attn).logsumexp(-1).sum().backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(g is not None for n, g in trained.items() if "lora_A" in n and ".experts." not in n)
    with pytest.raises(AgrpoError, match="did not extend the key/value cache"):  # checkpointing drops the cache
        Policy(model).chunk_logits(ids[:, :8], attn[:, :8], DynamicCache(), store=True)
    with pytest.raises(AgrpoError, match="match no linear layer"):
        load_model_and_tokenizer(str(path), dtype="float32", lora={"r": 2, "target_modules": ["gate"]})


# -- special tokens of the real checkpoints ------------------------------------------------------
def test_sdar_tokenizer_gives_the_mask_and_end_of_turn():
    from transformers import Qwen3Config

    tok = load_tokenizer(str(SHARED / "tokenizers" / "sdar"))
    config = Qwen3Config(vocab_size=151936, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, eos_token_id=151643)
    families.annotate(config, families.SDAR, tok)
    assert config.mask_token_id == 151669  # <|MASK|>
    assert config.eos_token_id == [151643, 151645]  # <|endoftext|>, then <|im_end|>
    assert config.block_size == 4


# -- mistakes a user can make ------------------------------------------------------------------
@pytest.mark.parametrize("family, change, message", [
    ("sdar", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("sdar", {"model_type": "sdar_moe"}, "SDAR MoE .* trust_remote_code=true"),
    ("llada2", {"score_function": "softmax"}, "score_function='softmax'"),
    ("llada2", {"num_experts": 6}, "num_experts=6 is not a multiple of n_group=4"),
    ("llada2", {"rotary_dim": 6}, "rotary_dim=6 differs"),
])
def test_unsupported_settings_are_one_line(family, change, message, tmp_path):
    path = fixture_copy(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AgrpoError, match=message) as caught:
        load_model_and_tokenizer(str(path), dtype="float32")
    assert "\n" not in str(caught.value)
