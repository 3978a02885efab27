"""Make the tiny Llama the vLLM tests and `make vllm-demo` run: random weights from a seed, never downloaded.

4 layers, hidden 128, 4 attention heads, 2 KV heads (head_dim 32), a word-level
tokenizer over the words ``w0`` .. ``w{vocab-3}``. The same seed gives the same
weights, so every run compares the same model. Needs the vLLM venv (transformers,
tokenizers, torch).

    python -m kvxferd.integrations.vllm.tiny_model OUT_DIR [--seed 0]

Prints OUT_DIR. Does nothing if OUT_DIR already holds a model made with the same seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VOCAB = 512
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 4, 128, 4, 2, 256


def words(n: int) -> list[str]:
    """The tokenizer's words: what prompts are made of."""
    return [f"w{i}" for i in range(n)]


def make(out: Path, seed: int) -> Path:
    stamp = out / "kvxferd-tiny.json"
    want = {"seed": seed, "layers": LAYERS, "hidden": HIDDEN, "vocab": VOCAB}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + words(VOCAB - len(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: logits far apart, so no near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    stamp.write_text(json.dumps(want))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(make(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
