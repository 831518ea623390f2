"""Conversations and preference pairs -> token ids and loss masks, through the chat template.

Every sequence is tokenized by ``tokenizer.apply_chat_template`` (the call a user makes at
inference), so training ids equal inference ids, with one exception: the text of a special token inside
a message (a literal "</s>", e.g. the HTML strike-through tag ``<s>old</s>``) is encoded as plain text,
as sentencepiece encodes it in pretraining; only the template's own markers become special ids (a
plain ``apply_chat_template`` would train an eos in mid-answer). ``chat_ids`` is that call, and with
``launch/generate.py --chat`` the only one that gives these ids: transformers' ``apply_chat_template(...,
sanitize_control_tokens=True)`` (5.25) encodes such text differently after a space. The loss
mask marks the tokens the model is trained to *produce*: assistant content and its closing eos
(``{% generation %}`` spans; of a prompt-completion record only the completion's), or every token with
``assistant_only=False``. Tool results (role ``tool`` or ``ipython``, after an assistant turn) are
context, as a user turn is.

Malformed input raises ``BadRecord`` with a one-line reason; the caller adds file and line.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional

from doge_dist.data.inputs import BadRecord, check_unicode

TOOL_ROLES = ("tool", "ipython")  # a tool's result (ipython: Llama 3's and the published Doge template's name)
ROLES = ("system", "user", "assistant") + TOOL_ROLES
Messages = list[dict[str, str]]


def check_messages(messages: Any, field: str = "messages", need_assistant: bool = True) -> Messages:
    """The validated list of ``{role, content}`` dicts, or ``BadRecord`` naming the first problem. An
    empty system message (how many datasets write "no system prompt") is dropped: it says nothing."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"'{field}' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f"'{field}' message {number} is not an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord(f"'{field}' message {number} has unknown role {role!r} (use {', '.join(ROLES)})")
        if role == "system" and number != 1:
            raise BadRecord(f"'{field}' message {number}: a system message may only come first")
        if not isinstance(content, str):
            raise BadRecord(f"'{field}' message {number} ({role}) has content of type {type(content).__name__}, not a string")
        if not content.strip() and role != "system":
            raise BadRecord(f"'{field}' message {number} ({role}) has empty content")
        check_unicode(content, f"'{field}' message {number} ({role})")
    if need_assistant:
        check_turn_order(messages, field)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord(f"'{field}' has no assistant turn: nothing to train on")
    kept = [{"role": m["role"], "content": m["content"]} for m in messages if m["content"].strip()]
    if not kept:
        raise BadRecord(f"'{field}' holds only an empty system message")
    return kept


def check_turn_order(messages: Messages, field: str = "messages") -> None:
    """``BadRecord`` unless the turns after an optional system message alternate user, assistant, user, ...,
    where tool results may follow an assistant turn (which called the tools) and the assistant answers
    them: an answer to no question, or two turns of one role in a row, is a mislabelled conversation."""
    start = 1 if messages[0]["role"] == "system" else 0
    previous = None
    for number, message in enumerate(messages[start:], start=start + 1):
        role = message["role"]
        expected = "assistant" if previous == "user" or previous in TOOL_ROLES else "user"
        if role != expected and not (role in TOOL_ROLES and previous in ("assistant",) + TOOL_ROLES):
            raise BadRecord(f"'{field}' message {number} is {role!r} where {expected!r} belongs (after an optional "
                            "system message, turns alternate user, assistant, user, ...; tool results follow an "
                            "assistant turn and the assistant answers them)")
        previous = role


def sft_messages(record: dict) -> tuple[Messages, Messages]:
    """(prompt, conversation) of an SFT record: ``{"messages": [...]}`` (prompt []: every assistant turn
    is trained on), or TRL's prompt-completion ``{"prompt": ..., "completion": ...}`` (strings or message
    lists), whose prompt is not trained on (TRL's ``completion_only_loss``)."""
    if "messages" in record:
        return [], check_messages(record["messages"])
    if "prompt" in record and "completion" in record:
        prompt = prompt_messages(record["prompt"])
        return prompt, prompt + completion_messages(prompt, record["completion"], "completion")
    raise BadRecord(f"no key 'messages' (nor 'prompt' and 'completion'); this record has keys "
                    f"{', '.join(map(repr, record)) or '(none)'}")


def encode_conversation(tokenizer, messages: Messages, assistant_only: bool = True, max_length: int = 0,
                        cut: Optional[Counter] = None, prompt: Optional[Messages] = None) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one conversation; the tokens of its first messages ``prompt`` (with the
    generation prompt) carry no loss. ``max_length`` > 0 truncates from the right (counted in
    ``cut["conversations"]``, so that the tool can say how many it cut)."""
    cut = Counter() if cut is None else cut
    ids, mask = chat_ids(tokenizer, messages, assistant_mask=assistant_only)
    mask = mask if assistant_only else [1] * len(ids)
    if prompt and assistant_only:
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise BadRecord("the chat template tokenizes the prompt differently inside the full conversation")
        mask = [0] * len(prompt_ids) + mask[len(prompt_ids) :]
    if 0 < max_length < len(ids):
        ids, mask = ids[:max_length], mask[:max_length]
        cut["conversations"] += 1
    if not any(mask):
        raise BadRecord("no trainable token left (the assistant turns are beyond the maximum length)")
    return ids, mask


MARK = "\ue000"  # a private-use character around a special token's text inside a message, while rendering


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False,
             assistant_mask: bool = False) -> tuple[list[int], list[int]]:
    """(ids, assistant mask: [] unless ``assistant_mask``) of ``messages`` through the chat template, with
    message content as plain text (see the module docstring). A conversation without a special token's
    text in its content (nearly all) is ``apply_chat_template``'s own result."""
    specials = _special_tokens_pattern(tokenizer)
    kwargs = {"tokenize": True, "return_dict": True, "add_generation_prompt": add_generation_prompt}
    if assistant_mask:
        kwargs.update(return_assistant_tokens_mask=True, tokenizer_kwargs={"return_offsets_mapping": True})
    out = tokenizer.apply_chat_template(messages, **kwargs)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"]) if assistant_mask else []
    if not any(specials.search(m["content"]) for m in messages):
        return ids, mask
    text, pieces = _template_pieces(tokenizer, messages, specials, add_generation_prompt)
    plain, offsets = [], []
    for start, end, special in pieces:
        if special:
            plain.append(tokenizer.convert_tokens_to_ids(text[start:end]))
            offsets.append((start, end))
        else:  # as apply_chat_template's tokenizer call encodes the text between two special tokens
            run = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=assistant_mask)  # a slow tokenizer (generation only) has none
            plain += run["input_ids"]
            offsets += [(start + a, start + b) for a, b in run.get("offset_mapping", [])]
    if assistant_mask:  # the tokens over the characters that apply_chat_template masked
        mask = _overlapping(offsets, [span for span, on in zip(out["offset_mapping"], mask) if on], len(text))
    return plain, mask


def _special_tokens_pattern(tokenizer) -> re.Pattern:
    """The texts of the tokenizer's special tokens (bos, eos, ...), longest first as the tokenizer matches them."""
    texts = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts)) or "(?!)")


def _template_pieces(tokenizer, messages: Messages, specials: re.Pattern,
                     add_generation_prompt: bool) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered conversation and its (start, end, is a special token of the template) pieces: the
    special tokens' texts inside messages are marked while rendering, so that they stay in the text pieces."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if MARK in text:
        raise BadRecord("a message holds both the text of a special token and the private-use character U+E000")
    marked = [{**m, "content": specials.sub(lambda x: MARK + x.group(0) + MARK, m["content"])} for m in messages]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    if rendered.replace(MARK, "") != text:
        raise BadRecord("the chat template changes message content around the text of a special token")
    inside, position = set(), 0  # start offsets in ``text`` of the special tokens' texts inside messages
    for number, part in enumerate(rendered.split(MARK)):
        if number % 2:
            inside.add(position)
        position += len(part)
    pieces, position = [], 0
    for match in specials.finditer(text):
        if match.start() in inside:
            continue
        pieces += [(position, match.start(), False)] if match.start() > position else []
        pieces.append((match.start(), match.end(), True))
        position = match.end()
    pieces += [(position, len(text), False)] if position < len(text) else []
    return text, pieces


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], length: int) -> list[int]:
    """1 for each token (start, end) over a character of one of the ``spans`` of a ``length``-character text."""
    covered = bytearray(length)
    for start, end in spans:
        covered[start:end] = b"\1" * (end - start)
    return [int(any(covered[start:end])) for start, end in offsets]


def _as_messages(value: Any, field: str, role: str) -> Messages:
    if isinstance(value, str):
        return check_messages([{"role": role, "content": value}], field, need_assistant=False)
    if not isinstance(value, list):
        raise BadRecord(f"'{field}' is of type {type(value).__name__}: use a string or a non-empty list of {{role, content}} objects")
    return check_messages(value, field, need_assistant=False)


def prompt_messages(value: Any) -> Messages:
    """A record's 'prompt' (a string: one user turn) as messages, which the assistant answers next."""
    prompt = _as_messages(value, "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise BadRecord("'prompt' ends with an assistant turn; the completion must be the assistant's answer")
    return prompt


def completion_messages(prompt: Messages, value: Any, field: str) -> Messages:
    """The assistant's answer to ``prompt`` in a record's ``field`` (a string or messages). A list that
    repeats the prompt first (ultrafeedback_binarized style) has the prompt removed."""
    completion = _as_messages(value, field, "assistant")
    if completion[: len(prompt)] == prompt:
        completion = completion[len(prompt) :]
    if not completion or any(m["role"] != "assistant" for m in completion):
        raise BadRecord(f"'{field}' must be the assistant's answer (assistant messages after the prompt)")
    check_turn_order(prompt + completion, f"prompt + {field}")
    return completion


def preference_messages(record: dict) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages from strings or message lists."""
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        raise BadRecord(f"no key {', '.join(map(repr, missing))} (preference records need prompt, chosen, rejected)")
    prompt = prompt_messages(record["prompt"])
    completions = [completion_messages(prompt, record[field], field) for field in ("chosen", "rejected")]
    if completions[0] == completions[1]:
        raise BadRecord("'chosen' and 'rejected' are identical")
    return prompt, completions[0], completions[1]


def _ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    return chat_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)[0]


def encode_preference(tokenizer, record: dict, max_prompt_length: int, max_completion_length: int,
                      cut: Optional[Counter] = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of one pair. The prompt is rendered with the generation
    prompt and truncated from the left to ``max_prompt_length``; each completion is the rest of the
    full conversation's ids, truncated from the right to ``max_completion_length`` (0: no limit).
    ``cut["prompts"]`` and ``cut["completions"]`` count what was truncated."""
    cut = Counter() if cut is None else cut
    prompt, chosen, rejected = preference_messages(record)
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        full = _ids(tokenizer, prompt + completion, add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise BadRecord("the chat template tokenizes the prompt differently inside the full conversation")
        completion_ids = full[len(prompt_ids) :]
        if 0 < max_completion_length < len(completion_ids):
            completion_ids = completion_ids[:max_completion_length]
            cut["completions"] += 1
        completions.append(completion_ids)
    if completions[0] == completions[1]:  # e.g. they differ only beyond the limit: no gradient, margin 0, never accurate
        within = f" within --max-completion-length = {max_completion_length} tokens" if max_completion_length > 0 else " as tokens"
        raise BadRecord(f"'chosen' and 'rejected' are identical{within}")
    if 0 < max_prompt_length < len(prompt_ids):
        prompt_ids = prompt_ids[-max_prompt_length:]
        cut["prompts"] += 1
    return prompt_ids, completions[0], completions[1]
