"""Data sources, the catalog through the mirror and through its hub copies, and label spaces."""

import pytest

from conftest import FIXTURES
from nlpkit.data import (
    classification_examples,
    default_eval_source,
    infer_label_space,
    open_source,
    read_file,
    resolve_columns,
    subsample,
)
from nlpkit.errors import NlpkitError


def test_label_spaces_are_detected_from_the_labels():
    assert infer_label_space(read_file(FIXTURES / "sentiment_train.csv"), "label", "auto", None).names == ["0", "1"]
    topics = infer_label_space(read_file(FIXTURES / "topics.jsonl"), "label", "auto", None)
    assert topics.problem_type == "single_label_classification" and topics.names == ["food", "sports", "tech"]
    multi = infer_label_space(read_file(FIXTURES / "multilabel.jsonl"), "labels", "auto", None)
    assert multi.problem_type == "multi_label_classification"
    regression = infer_label_space(read_file(FIXTURES / "regression.csv"), "score", "auto", None)
    assert regression.problem_type == "regression" and regression.num_labels == 1


def test_numeric_labels_sort_numerically_and_take_names():
    rows = read_file(FIXTURES / "sentiment_train.csv")
    rows.rows += [{"text": "x", "label": 10}, {"text": "y", "label": 2}]
    names = {"0": "a", "1": "b", "2": "c", "10": "d"}
    assert infer_label_space(rows, "label", "auto", names).names == ["a", "b", "c", "d"]


def test_multilabel_rows_become_multi_hot():
    rows = read_file(FIXTURES / "multilabel.jsonl")
    space = infer_label_space(rows, "labels", "auto", None)
    columns = classification_examples(rows, "text", None, "labels", space, None)
    first = rows.rows[0]["labels"]
    assert columns["label"][0] == [1.0 if name in first else 0.0 for name in space.names]


def test_subsample_is_seeded_and_keeps_order():
    columns = {"text": list("abcdefghij"), "label": list(range(10))}
    a, b = subsample(columns, 4, seed=1), subsample(columns, 4, seed=1)
    assert a == b and a["label"] == sorted(a["label"]) and len(a["text"]) == 4


def test_catalog_reads_the_mirror(shared_data):
    sst2 = open_source("sst2", "train", "data.train", str(shared_data))
    assert len(sst2.rows) == 67349  # the README's count: unquoted TSV parsed right
    assert default_eval_source("sst2") == "sst2:validation"
    assert len(open_source("sst2:validation", "train", "data.eval", str(shared_data)).rows) == 872

    news = open_source("ag_news", "train", "data.train", str(shared_data))
    text, pair, label = resolve_columns(news, None, None, None)
    assert (text, pair, label) == ("title", "description", "label")
    space = infer_label_space(news, label, "auto", news.catalog.label_names)
    assert space.names == ["World", "Sports", "Business", "Sci/Tech"] and len(news.rows) == 6000


def test_folder_source_picks_the_split_file(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "validation.csv").write_text("text,label\nc,0\n")
    assert len(open_source(str(tmp_path), "validation", "data.eval").rows) == 1
    assert len(open_source(str(tmp_path), "train", "data.train").rows) == 2


# ---------------------------------------------------------------------------------------------- hub copies
# Rows in each public hub copy's own layout (column names, label numbering, splits), as load_dataset returns them.
HUB_ROWS = {
    ("stanfordnlp/sst2", "validation"): [{"idx": 0, "sentence": "it 's a charming journey .", "label": 1},
                                         {"idx": 1, "sentence": "unflinchingly bleak", "label": 0}],
    ("fancyzhx/ag_news", "train"): [{"text": "Wall St. Bears Claw Back Reuters - Short-sellers ...", "label": 2},
                                    {"text": "Phelps wins gold AP - Michael Phelps ...", "label": 1},
                                    {"text": "Talks resume UN - Envoys met ...", "label": 0},
                                    {"text": "New chip ships Reuters - A faster ...", "label": 3}],
    ("databricks/databricks-dolly-15k", "train"): [
        {"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.",
         "category": "open_qa" if i % 3 else "summarization"} for i in range(330)
    ] + [{"instruction": "QUESTION 1?", "context": "", "response": "a duplicate", "category": "open_qa"}],
    ("openai/gsm8k", "test"): [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}],
    ("Anthropic/hh-rlhf", "train"): [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a secret\n\nAssistant: I would rather not.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a secret\n\nAssistant: Here is one."},
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},  # prompts differ
    ],
    ("google-research-datasets/mbpp", "validation"): [
        {"task_id": 511, "text": "Write a python function to add two numbers.", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "", "challenge_test_list": []}],
}


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from HUB_ROWS; the calls it got are kept, to check ids, configs and splits."""
    import datasets

    calls = []

    def load_dataset(path, split=None, **options):
        calls.append((path, split, options))
        return datasets.Dataset.from_list(HUB_ROWS[path, split])

    monkeypatch.delenv("NLPKIT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_without_a_mirror_sst2_and_ag_news_load_their_hub_copies_with_the_mirrors_labels(fake_hub):
    sst2 = open_source("sst2:validation", "train", "data.eval")
    assert sst2.rows == [{"sentence": "it 's a charming journey .", "label": 1},
                         {"sentence": "unflinchingly bleak", "label": 0}]
    assert resolve_columns(sst2, None, None, None) == ("sentence", None, "label")
    assert infer_label_space(sst2, "label", "auto", sst2.catalog.label_names).names == ["negative", "positive"]

    news = open_source("ag_news", "train", "data.train")
    assert fake_hub[-1] == ("fancyzhx/ag_news", "train", {})
    text, pair, label = resolve_columns(news, None, None, None)
    assert (text, pair, label) == ("text", None, "label")  # the hub joins title and description into `text`
    assert [row["label"] for row in news.rows] == [3, 2, 1, 4]  # 0-3 shifted to the mirror's 1-4
    space = infer_label_space(news, label, "auto", news.catalog.label_names)
    columns = classification_examples(news, text, pair, label, space, news.catalog.label_names)
    assert space.names == ["World", "Sports", "Business", "Sci/Tech"]
    assert [space.names[i] for i in columns["label"]] == ["Business", "Sports", "World", "Sci/Tech"]
    assert news.name == "fancyzhx/ag_news:train" and news.where(0) == "fancyzhx/ag_news:train row 1"


def test_without_a_mirror_dolly_is_open_qa_only_with_a_held_out_test_split(fake_hub):
    train = open_source("dolly", "train", "data.train")
    test = open_source(default_eval_source("dolly"), "test", "data.eval")
    assert [call[:2] for call in fake_hub] == [("databricks/databricks-dolly-15k", "train")] * 2  # one hub split
    assert len(test.rows) == 200 and len(train.rows) == 220 - 200  # 220 open_qa rows, the duplicate dropped
    assert set(train.rows[0]) == {"instruction", "response"}
    assert not {r["instruction"] for r in train.rows} & {r["instruction"] for r in test.rows}
    assert all(int(r["instruction"].split()[1].rstrip("?")) % 3 for r in train.rows + test.rows)  # no summarization
    assert open_source("dolly:test", "train", "data.eval").rows == test.rows  # seeded: the same split every time


def test_without_a_mirror_gsm8k_hh_rlhf_and_mbpp_map_to_the_mirrors_columns(fake_hub):
    gsm8k = open_source("gsm8k:test", "train", "data.eval")
    assert fake_hub[-1] == ("openai/gsm8k", "test", {"name": "main"})
    assert gsm8k.rows == [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}]

    hh = open_source("hh_rlhf", "train", "data.train")
    assert fake_hub[-1] == ("Anthropic/hh-rlhf", "train", {"data_dir": "harmless-base"})
    assert len(hh.rows) == 1  # the pair whose prompts differ is dropped, as in the mirror
    pair = hh.rows[0]
    assert pair["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a secret\n\nAssistant:"
    assert (pair["chosen"], pair["rejected"]) == (" I would rather not.", " Here is one.")
    assert pair["prompt"] + pair["chosen"] == pair["chosen_full"]

    mbpp = open_source("mbpp:validation", "train", "data.eval")
    assert fake_hub[-1] == ("google-research-datasets/mbpp", "validation", {"name": "full"})
    assert mbpp.rows[0]["test_list"] == ["assert add(1, 2) == 3"] and mbpp.rows[0]["task_id"] == 511


def test_no_mirror_and_no_hub_is_one_line_naming_both_ways(monkeypatch):
    import datasets

    def offline(path, **options):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.delenv("NLPKIT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(NlpkitError) as error:
        open_source("sst2", "train", "data.train")
    assert str(error.value) == (
        "data.train stanfordnlp/sst2:train: could not load it from the hub (ConnectionError); set NLPKIT_DATA_DIR "
        "(or data.mirror) to a data mirror holding sst2/train.tsv, or connect to the hub")
    with pytest.raises(NlpkitError, match="ppo_prompts: has no public hub copy, it is read from a data mirror only"):
        open_source("ppo_prompts", "train", "data.train")
    with pytest.raises(NlpkitError, match="gsm8k has no split 'validation'; splits: train, test"):
        open_source("gsm8k:validation", "train", "data.eval")
