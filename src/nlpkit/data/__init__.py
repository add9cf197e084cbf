"""Data: where rows come from (sources.py), what they mean by shape (formats.py, preference.py), and the dataset doctor (check.py).

The names below are the package's interface; each lives in the module named beside it.
"""

from nlpkit.data.formats import (  # noqa: F401
    LabelSpace,
    classification_examples,
    code_records,
    detect_sft_format,
    infer_label_space,
    is_code_set,
    prompt_column,
    prompt_records,
    resolve_columns,
    sft_dataset,
    sft_example,
    split_prompts,
    tokenize_classification,
)
from nlpkit.data.preference import (  # noqa: F401
    chat_prompt_ids,
    chat_reply_ids,
    kto_chats,
    pair_ids,
    preference_chats,
    preference_columns,
)
from nlpkit.data.sources import (  # noqa: F401
    CATALOG,
    Rows,
    catalog_entry,
    default_eval_source,
    mirror_dir,
    open_source,
    read_file,
    subsample,
)
