"""Shared fixtures: an offline hand-built tokenizer, tiny randomly initialized models of every supported
family, an isolated cache directory and a small text corpus for key statistics.

Nothing here touches the network: tokenizers are assembled from a fixed vocabulary and models from configs.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported anywhere: never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

# The test models are tiny: one intra-op thread is as fast, and on a busy 2-core machine OpenMP threads that
# wait on each other make every small matmul 100-1000x slower (measured: 15 ms instead of 15 us).
torch.set_num_threads(1)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]

# Words the tests use (prompts, subjects, targets, corpus, context starts); each is one token.
_WORD_LINES = (
    "The the capital of is a an in and was born city country language speaks mother tongue",
    "France Paris Rome Italy Germany Berlin Spain Madrid London English French German Spanish Italian",
    "Danielle Darrieux Apple Google Microsoft Toyota Tokyo Japan Japanese Canada Ottawa Einstein",
    "Newton Mozart Piano violin plays works for located headquarters river lake mountain small large",
    "In A It When There This He She We Therefore Because I You they people lived there old new",
)
WORDS = [word for line in _WORD_LINES for word in line.split()]

PUNCT = list(".,:;!?'\"-()")
CHARS = list(string.ascii_letters + string.digits)


def _vocab() -> dict[str, int]:
    tokens = SPECIAL + list(dict.fromkeys(WORDS)) + CHARS + PUNCT + ["##" + c for c in CHARS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


VOCAB = _vocab()
VOCAB_SIZE = len(VOCAB)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over :data:`VOCAB`: listed words are single tokens, any other ASCII word falls
    back to characters (``Zorb`` -> ``Z ##o ##r ##b``), other characters map to ``<unk>``. A BERT-style
    normalizer drops control and zero-width characters. Prompts start with a ``<s>`` token whose offsets
    are empty, as Llama's tokenizer does, and offsets are returned for every other token."""
    tok = Tokenizer(models.WordPiece(VOCAB, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", VOCAB["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma")


def tiny_config(family: str, n_layers: int = 3, d_model: int = 32, d_ff: int = 64, **overrides):
    """A config for a tiny model of ``family`` with our vocabulary (d_ff given where the family allows)."""
    import transformers as tf

    common = {"vocab_size": VOCAB_SIZE, "bos_token_id": VOCAB["<s>"], "eos_token_id": VOCAB["</s>"]}
    common["pad_token_id"] = VOCAB["<pad>"]
    if family == "gpt2":
        config = tf.GPT2Config(n_positions=64, n_embd=d_model, n_layer=n_layers, n_head=2, n_inner=d_ff, **common)
    elif family == "gptj":
        config = tf.GPTJConfig(
            n_positions=64, n_embd=d_model, n_layer=n_layers, n_head=2, n_inner=d_ff, rotary_dim=8, **common
        )
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=64,
            **common,
        )
    else:
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "gemma": tf.GemmaConfig,
        }[family]
        extra = {"head_dim": d_model // 2} if family == "gemma" else {}
        config = cls(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=64,
            **extra,
            **common,
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, n_layers: int = 3, d_model: int = 32, d_ff: int = 64, **overrides):
    """A randomly initialized float32 causal LM of ``family`` in eval mode; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, n_layers, d_model, d_ff, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def make_model():
    """The :func:`tiny_model` factory, as a fixture."""
    return tiny_model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own DELTAEDIT_CACHE, so stats caches never touch the user's cache."""
    path = tmp_path_factory.mktemp("deltaedit-cache")
    monkeypatch.setenv("DELTAEDIT_CACHE", str(path))
    return path


CORPUS_SENTENCES = [
    "The capital of France is Paris",
    "The capital of Italy is Rome",
    "The capital of Germany is Berlin",
    "The capital of Spain is Madrid",
    "The capital of Japan is Tokyo",
    "The capital of Canada is Ottawa",
    "Danielle Darrieux speaks French",
    "Einstein was born in Germany",
    "Mozart plays the piano and the violin",
    "Toyota headquarters is located in Japan",
    "Apple and Google and Microsoft",
    "The river in the city is old",
    "She lived in a small city in Spain",
    "He works for a large country",
    "People there speaks the mother tongue",
    "The lake and the mountain in Canada",
]


def corpus_paragraphs(count: int = 96) -> list[str]:
    """``count`` distinct short paragraphs drawn from the vocabulary, in a fixed order."""
    out = []
    for i in range(count):
        a = CORPUS_SENTENCES[i % len(CORPUS_SENTENCES)]
        b = CORPUS_SENTENCES[(3 * i + 5) % len(CORPUS_SENTENCES)]
        out.append(f"{a}. {b}." if i % 2 else f"{a}, and {b.lower()}.")
    return out


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    """A plain-text corpus (paragraphs separated by blank lines) to use as ``stats_corpus``."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(corpus_paragraphs()) + "\n", encoding="utf-8")
    return path


def fast_config(corpus, **changes) -> dict:
    """Method options that keep a tiny editor fast and its edits successful: edited layers 0-1, a small
    statistics pass over ``corpus``, one short context, and P0 = I (``nullspace_threshold=1e9``; a random
    model's edits rarely become greedy inside a real null space, see test_editor.py)."""
    config = {
        "layers": [0, 1],
        "stats_corpus": str(corpus),
        "stats_samples": 64,
        "stats_max_length": 32,
        "n_contexts": 1,
        "context_tokens": 4,
        "steps": 15,
        "lr": 0.5,
        "nullspace_threshold": 1e9,
        # a random model needs large target vectors: ROME's clamp and decay, not MEMIT's 0.75 and 0.5
        "clamp_norm_factor": 4.0,
        "weight_decay": 1e-3,
    }
    config.update(changes)
    return config
