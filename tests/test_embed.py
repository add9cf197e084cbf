"""nlpkit embed: mean-pooled sentence embeddings, similarity ranking and word analogies."""

import pytest
import torch

from helpers import nlpkit
from nlpkit.embed import analogy, embed, load_encoder, whole_words


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return load_encoder(str(tiny_bert))


def test_embeddings_are_unit_mean_pooled_and_ignore_padding(encoder):
    model, tokenizer = encoder
    texts = ["good food", "the team won the match in extra time tonight"]
    vectors = embed(model, tokenizer, texts)
    assert vectors.shape == (2, model.config.hidden_size)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    # Alone (no padding) or batched with a longer text (padded): the same vector.
    assert torch.allclose(embed(model, tokenizer, texts[:1])[0], vectors[0], atol=1e-5)
    # By hand: the mean of the last hidden states over the real tokens.
    batch = tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        mean = model(**batch).last_hidden_state[0].mean(0)
    assert torch.allclose(vectors[0], mean / mean.norm(), atol=1e-5)


def test_analogy_ranks_whole_words_without_the_inputs(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPKIT_CACHE", str(tmp_path))
    model, tokenizer = encoder
    vocabulary = whole_words(tokenizer)
    assert vocabulary and all(w.isalpha() and not w.startswith("##") for w in vocabulary)
    assert "[CLS]" not in vocabulary and not any(w.startswith("#") for w in vocabulary)
    words = vocabulary[:3]
    result = analogy(model, tokenizer, *words, top_k=5)
    found = [c["word"] for c in result["candidates"]]
    assert len(found) == 5 and not set(found) & set(words) and set(found) <= set(vocabulary)
    cosines = [c["cosine"] for c in result["candidates"]]
    assert cosines == sorted(cosines, reverse=True)
    # The ranking is the cosine with emb(a) - emb(b) + emb(c), checked for the top candidate by hand.
    a, b, c, top = embed(model, tokenizer, [*words, found[0]])
    target = (a - b + c) / (a - b + c).norm()
    assert (top @ target).item() == pytest.approx(cosines[0], abs=1e-5)


def test_embed_cli(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPKIT_CACHE", str(tmp_path))
    result = nlpkit("embed", tiny_bert, "--similar", "good food", "tasty food", "the team won", "--json")
    assert result.code == 0, result.stderr
    ranked = result.json()["ranked"]
    assert [r["text"] for r in ranked] == sorted(["tasty food", "the team won"],
                                                 key=lambda t: -next(r["cosine"] for r in ranked if r["text"] == t))
    result = nlpkit("embed", tiny_bert, "--analogy", "food", "team", "tech", "--top-k", "3")
    assert result.code == 0, result.stderr
    assert "food - team + tech" in result.stdout and len(result.stdout.strip().splitlines()) == 4
    assert list((tmp_path / "embeddings").glob("*.pt"))  # the vocabulary embeddings were cached


@pytest.mark.parametrize("args, message", [
    (["--analogy", "king", "man"], "--analogy: takes three words"),
    (["--similar", "only one"], "--similar: got 1 text"),
    (["king", "man", "woman"], "choose one of --similar"),
    (["--similar", "--analogy", "a", "b", "c"], "choose one of --similar"),
])
def test_embed_bad_arguments_exit_2(tiny_bert, args, message):
    result = nlpkit("embed", tiny_bert, *args)
    assert result.code == 2 and message in result.stderr


@pytest.mark.slow
def test_minilm_related_sentences_beat_unrelated_and_king_queen():
    model, tokenizer = load_encoder("minilm")
    pairs = [("A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply."),
             ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Parliament passed the budget."),
             ("How do I bake bread?", "What is a good recipe for a loaf?", "The train leaves at noon.")]
    for query, related, unrelated in pairs:
        q, r, u = embed(model, tokenizer, [query, related, unrelated])
        assert (q @ r).item() > (q @ u).item() + 0.2, query
    found = [c["word"] for c in analogy(model, tokenizer, "king", "man", "woman", top_k=5)["candidates"]]
    assert "queen" in found
