"""`nlpkit chat`: a causal LM (an sft or rlhf run, or any model) answers with its own chat template, streamed.

    nlpkit chat runs/sft-dolly-lora --prompt "What is the capital of France?"   # one answer
    nlpkit chat smollm2-135m                                                      # a conversation on stdin
"""

from __future__ import annotations

from nlpkit.runs import load_causal_lm


def converse(model_ref: str, prompt: str | None, max_new_tokens: int) -> None:
    """One answer to `prompt`; without it, turns from stdin until an empty line or Ctrl-D."""
    model, tokenizer = load_causal_lm(model_ref)
    history = []
    while question := (prompt if prompt is not None else read_turn()):
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": stream_answer(model, tokenizer, history, max_new_tokens)})
        if prompt is not None:
            break


def read_turn() -> str:
    try:
        return input("you> ").strip()
    except EOFError:
        return ""


def stream_answer(model, tokenizer, history: list[dict], max_new_tokens: int) -> str:
    """Generate greedily, printing tokens to stdout as they come; EOS ends the answer."""
    import torch
    from transformers import TextStreamer

    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
