"""Preference rows: pairs (prompt, chosen, rejected) as the reward stage tokenizes them, and as chats (HH transcripts
split into turns) for the preference stages (dpo, kto, orpo, simpo); KTO's unpaired good/bad rows. Every row is
validated as it is converted; a bad one is reported with its file, line and field.
"""

from __future__ import annotations

import os
import re

from nlpkit.data.formats import row_field
from nlpkit.data.sources import Rows
from nlpkit.errors import NlpkitError


# ---------------------------------------------------------------------------------------------- preference rows (reward)


def preference_columns(rows: Rows) -> dict[str, list]:
    """Validate every row: prompt (optional, in every row or none), chosen, rejected as text.

    With an explicit prompt a reply may be blank (HH-RLHF prefers saying nothing in a few pairs: the score is then
    read at the EOS right after the prompt); a whole text never may.
    """
    explicit = "prompt" in rows.rows[0]
    needed = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    columns = {name: [] for name in needed}
    for i, row in enumerate(rows.rows):
        for name in needed:
            value = row.get(name)
            blank_allowed = explicit and name != "prompt"
            if not isinstance(value, str) or not (value.strip() or blank_allowed):
                what = "missing" if name not in row else "empty or not text"
                raise NlpkitError(f"{rows.where(i)}: {name!r} is {what}; preference rows need "
                                  f"{', '.join(needed)} (this row has {', '.join(row) or 'no fields'})")
            columns[name].append(value)
    return columns


def pair_ids(tokenizer, pairs: dict[str, list], max_length: int) -> dict[str, list]:
    """Token ids of prompt + chosen and prompt + rejected, each with the EOS the score is read at appended.

    Longer texts keep their end (left truncation): the replies and the EOS are what a pair is about, so no pair is
    dropped, only the oldest turns of a long conversation.
    """
    prompts = pairs.get("prompt") or [""] * len(pairs["chosen"])

    def encode(replies):
        return [tokenizer(p + r + tokenizer.eos_token)["input_ids"][-max_length:] for p, r in zip(prompts, replies)]

    return {"chosen_ids": encode(pairs["chosen"]), "rejected_ids": encode(pairs["rejected"])}


# ---------------------------------------------------------------------------------------------- preference chats (dpo)

HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")  # the turn markers of HH-RLHF transcripts, and their roles:
ROLES = {"Human": "user", "Assistant": "assistant"}

CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|$)", re.S)  # a ChatML-rendered prompt


def transcript_messages(text: str) -> list[dict]:
    """A text as chat messages: an HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") or a ChatML rendering
    (`nlpkit sample`'s pairs.jsonl: the prompt as SmolLM2 or Qwen saw it) turn by turn, any other text as one user
    message. The model's chat template then renders it as SFT renders a conversation, never twice."""
    if text.lstrip().startswith("<|im_start|>"):
        return [{"role": role, "content": content.strip()} for role, content in CHATML_TURN.findall(text)]
    parts = HH_TURN.split(text)
    if len(parts) == 1:
        return [{"role": "user", "content": text.strip()}]
    return [{"role": ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def preference_chats(rows: Rows) -> tuple[dict[str, list], int]:
    """preference_columns' rows as trl's conversational rows (prompt messages; chosen, rejected: one assistant message),
    and how many pairs were dropped because both replies are the same text. Explicit rows: the prompt's messages (a trailing empty assistant turn is the generation prompt) and the replies.
    Implicit rows: both transcripts' shared leading messages are the prompt; plain texts split where they part, at
    a word boundary. Both kinds of the same pair render identically.
    """
    pairs = preference_columns(rows)
    chats = {"prompt": [], "chosen": [], "rejected": []}
    for i, (chosen, rejected) in enumerate(zip(pairs["chosen"], pairs["rejected"])):
        if "prompt" in pairs:
            prompt = transcript_messages(pairs["prompt"][i])
            if prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
                prompt = prompt[:-1]
            replies = [[{"role": "assistant", "content": reply.strip()}] for reply in (chosen, rejected)]
        elif HH_TURN.search(chosen):
            a, b = transcript_messages(chosen), transcript_messages(rejected)
            shared = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prompt, replies = a[:shared], [a[shared:], b[shared:]]
        else:
            cut = os.path.commonprefix([chosen, rejected]).rfind(" ")  # the reply starts at a word
            prompt, replies = [{"role": "user", "content": chosen[:max(cut, 0)].strip()}], \
                [[{"role": "assistant", "content": text[max(cut, 0):].strip()}] for text in (chosen, rejected)]
        if not prompt or not prompt[0]["content"]:
            raise NlpkitError(f"{rows.where(i)}: chosen and rejected share no prompt text; give rows a 'prompt' "
                              "column (prompt, chosen, rejected)")
        for name, value in zip(("prompt", "chosen", "rejected"), (prompt, *replies)):
            chats[name].append(value)
    kept = [i for i in range(len(chats["prompt"])) if chats["chosen"][i] != chats["rejected"][i]]
    if not kept:
        raise NlpkitError(f"{rows.name}: chosen and rejected are the same text in every row, so there is no "
                          "preference to learn; check the chosen and rejected columns")
    return {name: [values[i] for i in kept] for name, values in chats.items()}, len(chats["prompt"]) - len(kept)


def kto_chats(rows: Rows) -> dict[str, list]:
    """KTO's unpaired rows (prompt, completion, label: true = a good completion), or preference pairs split into a
    good and a bad row each, as conversational rows."""
    if rows.rows and "chosen" in rows.rows[0]:
        pairs, _ = preference_chats(rows)
        return {"prompt": pairs["prompt"] * 2, "completion": pairs["chosen"] + pairs["rejected"],
                "label": [True] * len(pairs["chosen"]) + [False] * len(pairs["rejected"])}
    chats = {"prompt": [], "completion": [], "label": []}
    for i, row in enumerate(rows.rows):
        label = {"true": True, "1": True, "false": False, "0": False}.get(str(row.get("label")).strip().lower())
        if label is None:
            raise NlpkitError(f"{rows.where(i)}: 'label' is {'missing' if 'label' not in row else 'not true/false'};"
                              " kto rows need prompt, completion, label (true = a good completion), or chosen and "
                              f"rejected (this row has {', '.join(row) or 'no fields'})")
        chats["prompt"].append(transcript_messages(row_field(row, ("prompt",), rows, i, "kto")))
        reply = row_field(row, ("completion",), rows, i, "kto").strip()
        chats["completion"].append([{"role": "assistant", "content": reply}])
        chats["label"].append(label)
    return chats


def chat_prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """Token ids of a chat prompt rendered with the model's template and its generation prompt."""
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def chat_reply_ids(tokenizer, prompt: list[dict], reply: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a rendered prompt (with the generation prompt) and of its reply, as trl's preference trainers
    tokenize them (the reply starts where prompt + reply parts from the prompt alone), cut to max_length keeping
    the start: the reply is empty when the prompt fills it (stages.dpo drops such rows)."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    shared = len(os.path.commonprefix([prompt_ids, full]))
    return prompt_ids[:shared][:max_length], full[shared:][:max(max_length - shared, 0)]


