"""Tiny random causal LMs of every supported family, saved as a user's model folder would be.

    build_tiny("llama", tmp_path / "llama")   # config.json, model.safetensors, tokenizer files

Each model has 2 layers, a 32-wide residual stream and a 64-wide MLP, random weights drawn
from `seed` (norm scales included, so a norm read as w instead of 1 + w shows), and a
tokenizer trained here with the `tokenizers` library on the small fixed text below:

- byte-level BPE (GPT-2 style, "Ġdog") for gpt2, gpt_neox, opt, gptj, qwen2, qwen3;
- sentencepiece-like BPE (Metaspace "▁dog", byte fallback "<0x0A>") for the Llama and Gemma
  families and phi3.

Both have "dog" and " dog" as single tokens and the added token "<script>alert(1)</script>".
gpt_neox and phi3 pad their vocabulary (W_U has more rows than the tokenizer has tokens),
as Pythia and Phi-3 do. "opt_proj" is an OPT whose word_embed_proj_dim differs from its
hidden size, so it has project_in / project_out. `build_unsupported` saves a tiny BERT and
`build_without_mlp` a Llama whose checkpoint lacks its MLP weights.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

HIDDEN = 32
MLP = 64
LAYERS = 2
HEADS = 4
POSITIONS = 64

SCRIPT_TOKEN = "<script>alert(1)</script>"

BYTE_LEVEL_FAMILIES = ("gpt2", "gpt_neox", "opt", "opt_proj", "gptj", "qwen2", "qwen3", "gpt_neo", "phi", "gpt_bigcode",
                       "starcoder2", "falcon", "bloom")
SENTENCEPIECE_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "stablelm",
                          "smollm3", "granite", "cohere")
TINY_FAMILIES = BYTE_LEVEL_FAMILIES + SENTENCEPIECE_FAMILIES
# mixtures of experts (tests/test_moe.py): EXPERTS experts of EXPERT_WIDTH neurons, TOP_EXPERTS per token
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
EXPERTS, EXPERT_WIDTH, TOP_EXPERTS = 4, 16, 2
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")

# The families with one Linear in and one out: where each keeps its MLP, by the families' own module
# names (written here for the tests, not read from workers/adapters.py): (blocks, input projection,
# output projection, final norm, token embedding, the config field naming the activation; None:
# BLOOM's GELU, its tanh approximation, has none).
LINEAR_LAYOUT = {
    "gpt_neo": ("transformer.h", "mlp.c_fc", "mlp.c_proj", "transformer.ln_f", "transformer.wte", "activation_function"),
    "phi": ("model.layers", "mlp.fc1", "mlp.fc2", "model.final_layernorm", "model.embed_tokens", "hidden_act"),
    "gpt_bigcode": ("transformer.h", "mlp.c_fc", "mlp.c_proj", "transformer.ln_f", "transformer.wte",
                    "activation_function"),
    "starcoder2": ("model.layers", "mlp.c_fc", "mlp.c_proj", "model.norm", "model.embed_tokens", "hidden_act"),
    "falcon": ("transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "transformer.ln_f",
               "transformer.word_embeddings", "activation"),
    "bloom": ("transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "transformer.ln_f",
              "transformer.word_embeddings", None),
}

TRAINING_TEXT = """\
The dog sat on the mat. A dog is a good friend, and the dog likes the park.
My dog runs fast; your dog sleeps all day. The dog and the cat play in the garden.
dog food, dog house, dog days: every dog has its day. Is that dog yours?
Where is the dog? The dog is in the house with the other dog.
def feed(dog):
    dog.eat(food)
    return dog

class Dog:
    def __init__(self, name):
        self.name = name

    def bark(self):
        print("woof", self.name)

for dog in dogs:
    if dog.hungry:
        feed(dog)
dog = Dog("Rex")
dog.bark()
import os
import sys
def main(argv=None):
    args = parse(argv)
    with open(args.path) as f:
        for line in f:
            print(line.strip())
    return 0

if __name__ == "__main__":
    sys.exit(main())
The quick brown fox jumps over the lazy dog. The lazy dog did not move.
A small dog, a big dog, a red dog and a blue dog went to the city.
bulldog, hotdog, sheepdog, underdog, watchdog: (dog) [dog] {dog} "dog" self.dog my.dog
"""


def _training_lines(*, keepends: bool = True) -> list[str]:
    return TRAINING_TEXT.splitlines(keepends=keepends) * 8


@functools.cache
def _byte_level_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_lines(), trainer)
    _check_dog(tok, "dog", "Ġdog")
    return tok.to_str()


@functools.cache
def _sentencepiece_json() -> str:
    """A Llama-style tokenizer: ▁ pieces, <unk>/<s>/</s> at ids 0-2, byte fallback <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=240, special_tokens=specials, show_progress=False)
    # lines without "\n", so a newline is byte fallback "<0x0A>" as in Llama's tokenizer
    trained.train_from_iterator(_training_lines(keepends=False), trainer)
    spec = json.loads(trained.to_str())["model"]

    vocab = {tok: i for i, tok in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    _check_dog(tok, "dog", "▁dog")
    return tok.to_str()


def _check_dog(tok, *pieces: str) -> None:
    vocab = tok.get_vocab()
    missing = [p for p in pieces if p not in vocab]
    if missing:
        raise AssertionError(f"tiny tokenizer lacks single-token pieces {missing}; add them to TRAINING_TEXT")


def tiny_tokenizer(style: str):
    """A fresh PreTrainedTokenizerFast of `style` ("byte_level" or "sentencepiece")."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style == "byte_level":
        backend = Tokenizer.from_str(_byte_level_json())
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    elif style == "sentencepiece":
        backend = Tokenizer.from_str(_sentencepiece_json())
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    backend.add_tokens([AddedToken(SCRIPT_TOKEN, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def tokenizer_style(family: str) -> str:
    return "sentencepiece" if family in SENTENCEPIECE_FAMILIES or family == "mixtral" else "byte_level"


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _config(family: str, tokenizer):
    import transformers as tf

    vocab = len(tokenizer)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    }
    decoder = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": POSITIONS,
        **ids,
    }
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, **ids
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**{**decoder, "vocab_size": _padded(vocab)}, rotary_pct=0.5, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**decoder, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**decoder, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**decoder, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**decoder, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    if family == "gemma":
        return tf.GemmaConfig(**decoder, num_key_value_heads=1, head_dim=8, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        return tf.Gemma2Config(
            **decoder,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=50.0,
        )
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(
            **decoder,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            final_logit_softcapping=3.0,
        )
    if family in ("opt", "opt_proj"):
        return tf.OPTConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            ffn_dim=MLP,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=POSITIONS,
            word_embed_proj_dim=16 if family == "opt_proj" else HIDDEN,
            **ids,
        )
    if family == "gptj":
        return tf.GPTJConfig(
            vocab_size=vocab, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP,
            rotary_dim=4, tie_word_embeddings=False, **ids,
        )  # fmt: skip
    if family == "gpt_neo":
        return tf.GPTNeoConfig(
            vocab_size=vocab, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=MLP,
            max_position_embeddings=POSITIONS, attention_types=[[["global", "local"], LAYERS // 2]], window_size=16,
            **ids,
        )  # fmt: skip
    if family == "phi":
        return tf.PhiConfig(**decoder, tie_word_embeddings=False)
    if family == "gpt_bigcode":
        return tf.GPTBigCodeConfig(
            vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, n_positions=POSITIONS, **ids,
        )  # fmt: skip
    if family == "starcoder2":
        return tf.Starcoder2Config(**decoder, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "falcon":
        return tf.FalconConfig(
            vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_hidden_size=MLP,
            max_position_embeddings=POSITIONS, tie_word_embeddings=False, **ids,
        )  # fmt: skip
    if family == "bloom":
        # BLOOM's MLP is 4 x hidden_size, fixed: a tiny one of hidden 16 has MLP neurons
        return tf.BloomConfig(vocab_size=vocab, hidden_size=MLP // 4, n_layer=LAYERS, n_head=HEADS, **ids)
    if family == "granite":
        return tf.GraniteConfig(**decoder, num_key_value_heads=2, logits_scaling=2.0, tie_word_embeddings=False)
    if family == "cohere":
        return tf.CohereConfig(**decoder, num_key_value_heads=2, logit_scale=0.5, tie_word_embeddings=False)
    if family == "olmo":
        return tf.OlmoConfig(**decoder, tie_word_embeddings=False)
    if family == "olmo2":
        return tf.Olmo2Config(**decoder, tie_word_embeddings=False)
    if family == "stablelm":
        return tf.StableLmConfig(**decoder, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "smollm3":
        return tf.SmolLM3Config(**decoder, num_key_value_heads=2, tie_word_embeddings=True)
    moe = {**decoder, "num_key_value_heads": 2, "num_experts_per_tok": TOP_EXPERTS, "tie_word_embeddings": False}
    if family == "mixtral":
        return tf.MixtralConfig(**{**moe, "intermediate_size": EXPERT_WIDTH}, num_local_experts=EXPERTS)
    if family == "olmoe":
        return tf.OlmoeConfig(**{**moe, "intermediate_size": EXPERT_WIDTH}, num_experts=EXPERTS)
    if family == "qwen2_moe":  # with its shared expert; every layer sparse
        return tf.Qwen2MoeConfig(**moe, moe_intermediate_size=EXPERT_WIDTH, shared_expert_intermediate_size=24,
                                 num_experts=EXPERTS, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**moe, moe_intermediate_size=EXPERT_WIDTH, num_experts=EXPERTS, head_dim=8,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if family == "phi3":
        return tf.Phi3Config(
            **{**decoder, "vocab_size": _padded(vocab)},
            num_key_value_heads=HEADS,
            original_max_position_embeddings=POSITIONS,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no tiny model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def _randomise(model, seed: int, *, norm_center: float) -> None:
    """Weights that make every term visible: matrices ~ N(0, 0.3), norm scales ~ center + N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(0.3 * noise)
            elif name.endswith("weight"):  # a norm's scale
                p.copy_(norm_center + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def build_tiny(family: str, path, *, seed: int = 0) -> Path:
    """Save a tiny random model of `family` (one of TINY_FAMILIES or MOE_FAMILIES) with its tokenizer into `path`."""
    tokenizer = tiny_tokenizer(tokenizer_style(family))
    return save_tiny(_config(family, tokenizer), tokenizer, path, seed=seed,
                     norm_center=0.0 if family in GEMMA_FAMILIES else 1.0)


def tiny_model(family: str, *, seed: int = 0):
    """The model build_tiny saves for `family`, in memory, in eval mode (nothing written)."""
    config = _config(family, tiny_tokenizer(tokenizer_style(family)))
    return random_model(config, seed=seed, norm_center=0.0 if family in GEMMA_FAMILIES else 1.0)


def random_model(config, *, seed: int = 0, norm_center: float = 1.0):
    """A causal LM of a transformers `config`, its weights drawn by _randomise, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomise(model, seed, norm_center=norm_center)
    return model.eval()


def save_tiny(config, tokenizer, path, *, seed: int = 0, norm_center: float = 1.0) -> Path:
    """Save a random causal LM of a transformers `config` (weights as _randomise draws them) with `tokenizer` into `path`."""
    path = Path(path)
    model = random_model(config, seed=seed, norm_center=norm_center)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_unsupported(path, *, seed: int = 0) -> Path:
    """Save a tiny BERT (an architecture Needle does not support) with a tokenizer into `path`."""
    from transformers import BertConfig, BertForMaskedLM

    path = Path(path)
    tokenizer = tiny_tokenizer("byte_level")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        max_position_embeddings=POSITIONS,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_without_mlp(path, *, seed: int = 0) -> Path:
    """A tiny Llama whose checkpoint lacks every MLP weight (transformers would fill them with random values)."""
    from safetensors.torch import load_file, save_file

    path = build_tiny("llama", path, seed=seed)
    weights = path / "model.safetensors"
    kept = {name: t for name, t in load_file(str(weights)).items() if ".mlp." not in name}
    save_file(kept, str(weights), metadata={"format": "pt"})
    return path


def add_bos(path) -> Path:
    """Make the tokenizer saved in `path` put its BOS token in front of every text, as Llama's does:
    a TemplateProcessing post-processor "<bos> $A" in tokenizer.json."""
    path = Path(path)
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    bos = config["bos_token"]
    bos = bos["content"] if isinstance(bos, dict) else bos
    bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == bos)
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return path


DETECTOR_STRENGTH = 3.0


def build_detector(
    path, detectors: dict[tuple[int, int], str | tuple[str, ...]], *, seed: int = 0, bos: bool = False
) -> Path:
    """A tiny random Llama in which neuron (layer, neuron) of each `detectors` entry fires on its
    token (or tokens) only.

    Entry k gets residual dimension k to itself: the token's embedding has DETECTOR_STRENGTH
    there and every other token's 0, and no attention or MLP output writes to it, so at every
    layer that dimension holds the token's embedding alone. The neuron's gate and up rows read
    only that dimension (norm scale 1), so its activation silu(g * x) * (u * x) is > 0 on the
    token and exactly 0 on every other token. With bos, the tokenizer puts BOS in front (add_bos).
    """
    from transformers import AutoModelForCausalLM

    path = build_tiny("llama", path, seed=seed)
    tokenizer = tiny_tokenizer("sentencepiece")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = model.model.layers
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        for dim, ((layer, neuron), pieces) in enumerate(detectors.items()):
            embed[:, dim] = 0.0
            for piece in [pieces] if isinstance(pieces, str) else pieces:
                token_id = tokenizer.convert_tokens_to_ids(piece)
                if token_id is None or token_id == tokenizer.unk_token_id:
                    raise ValueError(f"{piece!r} is not a token of the tiny tokenizer")
                embed[token_id, dim] = DETECTOR_STRENGTH
            for block in layers:
                block.self_attn.o_proj.weight[dim, :] = 0.0
                block.mlp.down_proj.weight[dim, :] = 0.0
            block = layers[layer]
            block.post_attention_layernorm.weight[dim] = 1.0
            for proj in (block.mlp.gate_proj, block.mlp.up_proj):
                proj.weight[neuron, :] = 0.0
                proj.weight[neuron, dim] = 4.0
    model.save_pretrained(path)
    if bos:
        add_bos(path)
    return path


# W_U[token] is scaled by this, so the token wins clearly where the neuron pushes it (and no other
# neuron's write happens to push it as hard: the scale amplifies every alignment with the row)
CLAMP_UNEMBED_SCALE = {"llama": 1.0, "gpt2": 1.5}
CLAMP_OUTPUT_SCALE = 0.5  # the neuron's output weights: this times the (scaled) W_U[token]


def build_clamp_model(
    path, *, family: str = "llama", layer: int = 0, neuron: int = 3, token_id: int | None = None,
    seed: int = 0, bos: bool = False,
) -> Path:
    """A tiny random model in which neuron (layer, neuron) writes along one token's unembedding.

    The token (default: the tokenizer's " dog") gets its LM head row W_U[token] scaled by
    CLAMP_UNEMBED_SCALE[family], and the neuron's output weights (row `neuron` of the adapter's
    output_weights view: down_proj.weight[:, neuron] for llama, the Conv1D c_proj.weight[neuron]
    for gpt2) become CLAMP_OUTPUT_SCALE * W_U[token]. Clamped at a large positive value the
    neuron's write dominates the residual stream (later layers read it through a norm, so what
    they add stays bounded), the final norm turns it into a multiple of W_U[token], and p(token)
    is high (about 0.8 for llama, 0.98 for gpt2); at a large negative value p(token) -> 0. The llama head is untied; gpt2's is tied to the input embedding, so there
    the token's embedding is scaled too. With bos, the tokenizer puts BOS in front (add_bos).
    """
    from transformers import AutoModelForCausalLM

    if family not in ("llama", "gpt2"):
        raise ValueError(f"no clamp model for family {family!r}; choose llama or gpt2")
    path = build_tiny(family, path, seed=seed)
    if token_id is None:
        tokenizer = tiny_tokenizer(tokenizer_style(family))
        token_id = tokenizer.convert_tokens_to_ids("▁dog" if family == "llama" else "Ġdog")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [V, d_model]; gpt2: the input embedding too
        head[token_id] *= CLAMP_UNEMBED_SCALE[family]
        direction = CLAMP_OUTPUT_SCALE * head[token_id]
        if family == "llama":
            model.model.layers[layer].mlp.down_proj.weight[:, neuron] = direction
        else:
            model.transformer.h[layer].mlp.c_proj.weight[neuron, :] = direction
    model.save_pretrained(path)
    if bos:
        add_bos(path)
    return path
