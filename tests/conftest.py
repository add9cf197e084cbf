"""Offline fixtures: a tiny random BERT built from a config, with a WordPiece tokenizer trained in-process."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the default tests may reach a model hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# The data mirror: $NLPKIT_DATA_DIR where set (make sets it only where ../shared/data exists), else ../shared/data.
SHARED_DATA = Path(os.environ.get("NLPKIT_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def corpus() -> list[str]:
    lines = []
    for path in FIXTURES.iterdir():
        lines += path.read_text().replace("\t", " ").replace(",", " ").splitlines()
    return lines


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 64: multiples of 64 keep bitsandbytes' CPU kernels happy) saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    config = BertConfig(vocab_size=raw.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny-bert")
    with torch.random.fork_rng():  # the same random weights in every run, so a CI failure reproduces here
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained in-process, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Like SmolLM2: ChatML, and the end of an assistant turn is the EOS.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>",
                                        model_max_length=128, additional_special_tokens=specials[2:3])
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"data mirror not found at {SHARED_DATA} (a clone without ../shared beside it and no "
                    "NLPKIT_DATA_DIR): tests that read the real datasets skip")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------- the RLHF toy
# the offline toy of docs/ppo-checklist.md: a word-level vocabulary, a tiny random Llama, and preferences for "positive" words.
POSITIVE = ["good", "great", "happy", "love", "nice", "wonderful", "excellent", "fine", "best", "joy"]
NEUTRAL = ["the", "a", "cat", "dog", "runs", "sits", "table", "house", "tree", "car", "blue", "red", "green", "walks",
           "eats", "sees", "today", "then", "and", "with", "on", "under", "big", "small", "old", "new", "bird", "fish",
           "park", "road", "rain", "sun", "moon"]
TOY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # 4 + 10 + 33 = 47 words; pad, bos and eos all distinct


@pytest.fixture(scope="module")
def one_torch_thread():
    """Matrices of a 64-wide model are too small to split across threads: one thread is faster, and on shared cores
    it avoids the oversubscription docs/stack-notes.md describes. Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) over a 47-word WordLevel vocabulary, no chat template: prompts are plain text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(TOY_SPECIALS + POSITIVE + NEUTRAL)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", model_max_length=64)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("toy-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_toy_preferences(path: Path, pairs: int, seed: int) -> Path:
    """prompt/chosen/rejected rows: chosen continuations draw positive words with p=0.5, rejected with p=0.1."""
    import json
    import random

    rng = random.Random(seed)

    def continuation(p_positive):
        return " " + " ".join(rng.choice(POSITIVE) if rng.random() < p_positive else rng.choice(NEUTRAL)
                              for _ in range(rng.randint(3, 8)))

    with path.open("w") as f:
        for _ in range(pairs):
            prompt = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"prompt": prompt, "chosen": continuation(0.5), "rejected": continuation(0.1)}) + "\n")
    return path


def write_toy_prompts(path: Path, count: int, seed: int) -> Path:
    import json
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 4)))}) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_reward_model(tmp_path_factory, toy_llama):
    """A reward model for positive words, trained with `nlpkit finetune` (stage: reward) on the toy vocabulary."""
    import yaml
    from helpers import nlpkit

    tmp = tmp_path_factory.mktemp("toy-rm")
    recipe = {
        "stage": "reward",
        "model": {"name": str(toy_llama)},
        "data": {"train": str(write_toy_preferences(tmp / "train.jsonl", 1200, seed=1)),
                 "eval": str(write_toy_preferences(tmp / "test.jsonl", 200, seed=2)), "max_length": 32},
        "train": {"max_steps": 100, "per_device_train_batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 0,
                  "logging_steps": 20, "save_strategy": "no", "bf16": False},
    }
    (tmp / "rm.yaml").write_text(yaml.safe_dump(recipe))
    result = nlpkit("finetune", tmp / "rm.yaml", "--output-dir", tmp / "rm", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["eval_pair_accuracy"] >= 0.85, result.json()
    return tmp / "rm"


# ---------------------------------------------------------------------------------------------- code problems
CODE_PROBLEMS = [  # MBPP's columns and shape: the function's name appears only in the asserts
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_setup_code": "", "test_list": ["assert add(2, 3) == 5", "assert add(1, 1) == 2", "assert add(0, 0) == 0"],
     "challenge_test_list": []},
    {"task_id": 2, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_setup_code": "", "test_list": ["assert square(3) == 9", "assert square(0) == 0", "assert square(-2) == 4"],
     "challenge_test_list": []},
    {"task_id": 3, "text": "Write a function to reverse a string.", "code": "def reverse(s):\n    return s[::-1]",
     "test_setup_code": "", "test_list": ["assert reverse('ab') == 'ba'", "assert reverse('') == ''"],
     "challenge_test_list": []},
]


def write_code_problems(path: Path, rows: list[dict] | None = None) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows or CODE_PROBLEMS))
    return path
