"""Writes the parity fixtures of tests/fixtures/parity/: for each architecture,
a tiny random-weight model built from transformers' own config class, saved
as a Hugging Face folder (config.json, model.safetensors in bf16, a byte-level
tokenizer.json and tokenizer_config.json), and transformers' own logits and
loss on fixed token ids with a right-padded attention mask
(reference.safetensors). The weights are rounded to bf16 first and the
reference is computed in f32 from the rounded values, so a loader that widens
bf16 to f32 sees exactly the weights transformers used.

Run through scripts/make_parity_fixtures.sh, which makes the virtual
environment. The Rust tests whose names contain `parity` load each folder
with our loader and model and compare.
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Small enough for tens of KiB per model, big enough for GQA, a sliding
# window shorter than the sequence and every projection shape.
VOCAB = 128
HIDDEN = 32
INTER = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
SEQ = 16
WINDOW = 6
SEED = 1234

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def configs():
    """(name, config, model class) for every fixture."""
    t = transformers
    return [
        ("llama", t.LlamaConfig(**COMMON, tie_word_embeddings=False), t.LlamaForCausalLM),
        (
            "llama_tied",
            t.LlamaConfig(**COMMON, tie_word_embeddings=True),
            t.LlamaForCausalLM,
        ),
        (
            "mistral",
            t.MistralConfig(**COMMON, sliding_window=WINDOW, tie_word_embeddings=False),
            t.MistralForCausalLM,
        ),
        ("qwen2", t.Qwen2Config(**COMMON, tie_word_embeddings=True), t.Qwen2ForCausalLM),
        (
            "qwen3",
            t.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True),
            t.Qwen3ForCausalLM,
        ),
        (
            "gemma2",
            t.Gemma2Config(
                **COMMON,
                head_dim=16,
                sliding_window=WINDOW,
                query_pre_attn_scalar=16,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                hidden_activation="gelu_pytorch_tanh",
            ),
            t.Gemma2ForCausalLM,
        ),
        (
            "gemma3",
            t.Gemma3TextConfig(
                **COMMON,
                head_dim=16,
                sliding_window=WINDOW,
                query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
            ),
            t.Gemma3ForCausalLM,
        ),
        (
            # Gemma 3 4B and larger: linear RoPE scaling on full-attention
            # layers only, and a query_pre_attn_scalar that is not head_dim.
            "gemma3_scaled",
            t.Gemma3TextConfig(
                **COMMON,
                head_dim=16,
                sliding_window=WINDOW,
                query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {
                        "rope_type": "linear",
                        "factor": 8.0,
                        "rope_theta": 1000000.0,
                    },
                },
            ),
            t.Gemma3ForCausalLM,
        ),
        ("phi3", t.Phi3Config(**COMMON, tie_word_embeddings=False), t.Phi3ForCausalLM),
        (
            "phi3_partial",
            t.Phi3Config(
                **COMMON,
                tie_word_embeddings=False,
                partial_rotary_factor=0.5,
                sliding_window=WINDOW,
            ),
            t.Phi3ForCausalLM,
        ),
    ]


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 3 specials, 256 bytes would
    not fit VOCAB, so bytes map onto ids modulo what is left."""
    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in alphabet[: VOCAB - len(specials)]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def inputs():
    """Two rows of SEQ ids; the second is right-padded after 11 tokens."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    return ids, mask


def write(name, config, cls, root):
    torch.manual_seed(SEED)
    model = cls(config).eval().to(torch.float32)
    # Random norms too, so that a (1 + w) against w mistake shows.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in name else 1.0))
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    tok = byte_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f, indent=1
        )
    for extra in ("generation_config.json",):
        path = os.path.join(out, extra)
        if os.path.exists(path):
            os.remove(path)
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    save_file(
        {
            "input_ids": ids.to(torch.int64).contiguous(),
            "attention_mask": mask.to(torch.int64).contiguous(),
            "logits": res.logits.to(torch.float32).contiguous(),
            "loss": res.loss.reshape(1).to(torch.float32).contiguous(),
        },
        os.path.join(out, "reference.safetensors"),
        metadata={
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )
    print(f"{name}: loss {res.loss.item():.6f}, {sum(p.numel() for p in model.parameters())} params")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity"
    only = set(sys.argv[2:])
    torch.use_deterministic_algorithms(True)
    for name, config, cls in configs():
        if only and name not in only:
            continue
        write(name, config, cls, root)


if __name__ == "__main__":
    main()
