"""Data sources, the catalog through the mirror, and label spaces."""


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
