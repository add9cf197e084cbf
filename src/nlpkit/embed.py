"""`nlpkit embed`: sentence similarity and word analogies with an encoder (the course's embeddings lab).

    nlpkit embed minilm --similar "A man is playing a guitar." "Someone plays an instrument." "Stocks fell today."
    nlpkit embed minilm --analogy king man woman

Embeddings are sentence-transformers' recipe for all-MiniLM-L6-v2: the encoder's last hidden states averaged over
the real (non-padding) tokens, then scaled to unit length, so a dot product is the cosine similarity. An analogy
A - B + C ("king - man + woman") embeds every whole-word token of the tokenizer's vocabulary the same way and ranks
them by cosine with emb(A) - emb(B) + emb(C), leaving out the three input words (3CosAdd).
"""

from __future__ import annotations

from pathlib import Path

from nlpkit.distributed import place
from nlpkit.errors import NlpkitError
from nlpkit.models import cache_dir, resolve_model

SPECIAL_PREFIXES = ("Ġ", "▁")  # byte-level BPE and SentencePiece mark a word start; WordPiece marks the rest (##)


def run(model_ref: str, texts: list[str], rank_similar: bool, solve_analogy: bool, top_k: int) -> dict:
    """`nlpkit embed`: --similar TEXT TEXT... ranks texts 2..n by cosine to text 1; --analogy A B C lists the words
    nearest A - B + C."""
    if rank_similar == solve_analogy:
        raise NlpkitError("nlpkit embed: choose one of --similar TEXT TEXT... or --analogy A B C")
    if solve_analogy and len(texts) != 3:
        raise NlpkitError(f"--analogy: takes three words A B C for A - B + C (got {len(texts)}), e.g. "
                          "--analogy king man woman")
    encoder, tokenizer = load_encoder(model_ref)
    if rank_similar:
        return similar(encoder, tokenizer, texts)
    return analogy(encoder, tokenizer, *texts, top_k=top_k)


def load_encoder(ref: str):
    """The bare encoder (any head dropped) and its tokenizer, from an alias, a model directory or a classify run."""
    from transformers import AutoModel

    from nlpkit.config import ModelSection
    from nlpkit.models import load_model, load_tokenizer

    model_cfg = ModelSection(name=ref)
    model = place(load_model(AutoModel, model_cfg, frozen=True)).eval()
    model.nlpkit_source = resolve_model(ref)  # where the weights came from: the key of the vocabulary cache
    return model, load_tokenizer(model_cfg)


def embed(model, tokenizer, texts: list[str], batch_size: int = 256, max_length: int = 256):
    """Unit-length mean-pooled embeddings, one row per text."""
    import torch

    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(model.device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # padding takes no part in the mean
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(rows)


def similar(model, tokenizer, texts: list[str]) -> dict:
    """The first text against the others, most similar first, and the full cosine matrix."""
    if len(texts) < 2:
        raise NlpkitError(f"--similar: got {len(texts)} text; give at least two (the first is compared with the rest)")
    vectors = embed(model, tokenizer, texts)
    matrix = vectors @ vectors.T
    ranked = sorted(({"text": text, "cosine": matrix[0, i].item()} for i, text in enumerate(texts) if i > 0),
                    key=lambda r: -r["cosine"])
    return {"query": texts[0], "ranked": ranked, "matrix": [[round(v, 4) for v in row] for row in matrix.tolist()]}


def analogy(model, tokenizer, a: str, b: str, c: str, top_k: int = 10) -> dict:
    """Whole words closest to emb(a) - emb(b) + emb(c), the inputs left out."""
    import torch

    vocabulary = whole_words(tokenizer)
    if not vocabulary:
        raise NlpkitError("MODEL: its tokenizer has no whole-word tokens to rank (a byte or character vocabulary); "
                          "use a word-piece encoder such as minilm")
    query = embed(model, tokenizer, [a, b, c])
    target = torch.nn.functional.normalize(query[0] - query[1] + query[2], dim=-1)
    scores = vocabulary_embeddings(model, tokenizer, vocabulary) @ target
    inputs = {a.lower(), b.lower(), c.lower()}
    candidates = []
    for index in scores.argsort(descending=True).tolist():
        if vocabulary[index].lower() not in inputs:
            candidates.append({"word": vocabulary[index], "cosine": scores[index].item()})
        if len(candidates) == top_k:
            break
    return {"analogy": f"{a} - {b} + {c}", "candidates": candidates, "vocabulary_size": len(vocabulary)}


def whole_words(tokenizer) -> list[str]:
    """Vocabulary entries that are whole alphabetic words: no continuation piece (##ing), no special or byte token."""
    special = set(tokenizer.all_special_tokens)
    words = set()
    for token in tokenizer.get_vocab():
        if token in special or token.startswith("##"):
            continue
        word = token[1:] if token.startswith(SPECIAL_PREFIXES) else token
        if len(word) > 1 and word.isascii() and word.isalpha():
            words.add(word)
    return sorted(words)  # sorted: the same order, hence the same ranking of ties, on every run


def vocabulary_embeddings(model, tokenizer, vocabulary: list[str]):
    """embed() of every vocabulary word, computed once per model and kept in the nlpkit cache: for MiniLM that is
    ~22k forward passes, half a minute to minutes on a busy 2-core CPU, and the same answer every time."""
    import hashlib

    import torch

    source = Path(getattr(model, "nlpkit_source", ""))
    weights = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    if not weights:  # a model we cannot fingerprint: compute, do not cache
        return embed(model, tokenizer, vocabulary)
    stamp = [str(source.resolve())] + [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights]
    key = hashlib.sha256("\n".join(stamp + vocabulary).encode()).hexdigest()[:20]
    path = cache_dir() / "embeddings" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    vectors = embed(model, tokenizer, vocabulary)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    torch.save(vectors, staging)
    staging.replace(path)  # a killed run never leaves a half-written cache file
    return vectors


def print_result(result: dict) -> None:
    """--similar's ranking or --analogy's candidates, one per line."""
    if "ranked" in result:
        print(f"most similar to: {result['query']}")
        for row in result["ranked"]:
            print(f"  {row['cosine']:+.3f}  {row['text']}")
    else:
        print(f"{result['analogy']} ~ (of {result['vocabulary_size']:,} whole-word tokens)")
        for row in result["candidates"]:
            print(f"  {row['cosine']:.3f}  {row['word']}")
