"""Chat data: the template ids are apply_chat_template's, the loss mask covers assistant turns only
(or everything), malformed conversations are reported with their line numbers (--strict stops),
preference pairs are truncated as stated, and packing never lets labels cross conversations."""
import inspect
import subprocess
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from chat_helpers import chat_tokenizer
from data_helpers import quiet, write_jsonl
from doge_dist.data import DataError
from doge_dist.data.chat import encode_conversation, encode_preference, sft_messages
from doge_dist.data.chat_dataset import IGNORE_INDEX, MaskedSequences, PreferenceDataset, SFTDataset, pack
from doge_dist.data.chat_template import load_chat_tokenizer
from doge_dist.data.inputs import BadRecord
from doge_dist.data.preprocess_chat import preprocess_chat
from train_helpers import PYTHON, REPO, env

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 * 4?"},
    {"role": "assistant", "content": "4 * 4 = 16."},
]
PAIR = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."}


def test_ids_are_apply_chat_template_and_mask_is_assistant_turns():
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    ids, mask = encode_conversation(tokenizer, MESSAGES)
    assert ids == AutoTokenizer.from_pretrained(chat_tokenizer()).apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == len(MESSAGES)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "2 + 3 = 5.</s>4 * 4 = 16.</s>"  # assistant content and its eos, nothing else
    _, every = encode_conversation(tokenizer, MESSAGES, assistant_only=False)
    assert all(every)


def test_special_token_text_inside_a_message_stays_text():
    """An answer about the HTML strike-through tag <s>...</s>: only the template's own bos/eos are special
    ids, the content is encoded as plain text (an eos in mid-answer would teach the model to stop there)."""
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    answer = "Use <s>old price</s> to strike it, then keep writing."
    messages = [{"role": "user", "content": "Is </s> a tag?"}, {"role": "assistant", "content": answer}]
    ids, mask = encode_conversation(tokenizer, messages)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == len(messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained[-1] == tokenizer.eos_token_id and tokenizer.decode(trained) == answer + "</s>"
    plain = tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert plain[1:] == trained[: len(plain) - 1]  # as plain text (less the prefix space of a fresh string)
    prompt, chosen, rejected = encode_preference(tokenizer, {"prompt": messages[:1], "chosen": answer, "rejected": "No."}, 0, 0)
    assert chosen == trained and prompt == ids[: len(prompt)] and prompt.count(tokenizer.eos_token_id) == 1
    if "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters:  # newer transformers
        assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    sanitize_control_tokens=True)["input_ids"]


def test_malformed_conversations_are_reported_with_line_numbers(tmp_path):
    good = {"messages": MESSAGES[1:3]}
    lines = [
        good,
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        "{not json",
        good,
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", lines)
    report = preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert (report.documents, report.bad) == (2, 4)
    expected = {2: "unknown role 'wizard'", 3: "empty content", 4: "no assistant turn", 5: "malformed JSON"}
    for (line, reason), where in zip(expected.items(), report.bad_locations):
        assert where.startswith(f"{source}:{line}: ") and reason in where
    with pytest.raises(DataError, match=r"chat.jsonl:2: .*unknown role"):
        preprocess_chat(str(source), str(tmp_path / "strict"), str(chat_tokenizer()), strict=True, log=quiet)
    assert not (tmp_path / "strict_text_document.bin").exists()  # nothing half-written
    cli = subprocess.run([PYTHON, "data_tools/preprocess_chat.py", "--kind", "sft", "--input", str(source), "--tokenizer",
                          str(chat_tokenizer()), "--output-prefix", str(tmp_path / "cli"), "--strict"],
                         cwd=REPO, env=env(), capture_output=True, text=True)
    assert cli.returncode == 1 and "chat.jsonl:2:" in cli.stderr


def test_deeply_nested_json_is_a_bad_record_not_a_crash(tmp_path):
    """json's decoder recurses once per level: 100,000 "[" raised RecursionError out of the tool."""
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES[1:3]}, "[" * 100_000])
    report = preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert (report.documents, report.bad) == (1, 1)
    assert report.bad_locations == [f"{source}:2: JSON nested too deeply to read"]


def test_roles_out_of_order_and_non_string_content_are_named(tmp_path):
    """An answer to no question, two turns of one role in a row, non-string content and a lone surrogate
    (a tokenizer TypeError) are bad records with their own reason (not "empty content"); SFT
    conversations and DPO prompt + completion alike."""
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    lines = [
        {"messages": [answer, user, answer]},
        {"messages": [user, user, answer]},
        {"messages": [MESSAGES[0], user, answer, answer]},
        {"messages": [user, {"role": "assistant", "content": 5}]},
        {"messages": [MESSAGES[0], user, answer, user, answer]},
        '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "hello"}]}',
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", lines)
    report = preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert (report.documents, report.bad) == (1, 5)
    expected = {1: "message 1 is 'assistant' where 'user' belongs", 2: "message 2 is 'user' where 'assistant' belongs",
                3: "message 4 is 'assistant' where 'user' belongs", 4: "content of type int, not a string",
                6: "'messages' message 1 (user) holds a lone UTF-16 surrogate (\\ud800 at character 3)"}
    for (line, reason), where in zip(expected.items(), report.bad_locations):
        assert where.startswith(f"{source}:{line}: ") and reason in where, where
    pairs = [
        {"prompt": [answer, user], "chosen": "yes", "rejected": "no"},
        {"prompt": "hi", "chosen": 5, "rejected": "no"},
        {"prompt": "hi", "chosen": "yes", "rejected": "no"},
    ]
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    report = preprocess_chat(str(source), str(tmp_path / "pairs"), str(chat_tokenizer()), kind="dpo", log=quiet)
    assert (report.documents, report.bad) == (1, 2)
    assert "message 1 is 'assistant' where 'user' belongs" in report.bad_locations[0]
    assert "'chosen' is of type int" in report.bad_locations[1]


def test_sft_files_and_packing(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}, {"messages": MESSAGES[3:]}])
    preprocess_chat(str(source), str(tmp_path / "sft"), str(chat_tokenizer()), log=quiet)
    sequences = MaskedSequences([str(tmp_path / "sft_text_document")], pairs=False)
    assert len(sequences) == 3
    lengths = sequences.lengths
    packed = SFTDataset(sequences, int(lengths.sum()), packing=True)
    assert len(packed) == 1 and pack(lengths, int(lengths[0])) == [[0], [1, 2]]
    sample = packed[0]
    starts = np.cumsum([0, *lengths[:-1]])
    assert sample["position_ids"][starts].tolist() == [0, 0, 0]  # positions restart per conversation
    assert (sample["labels"][starts[1:] - 1] == IGNORE_INDEX).all()  # no label crosses into the next one
    for index, start in enumerate(starts):  # each packed piece equals the padded sample
        alone = SFTDataset(sequences, 1000, packing=False)[index]
        assert torch.equal(sample["labels"][start : start + lengths[index]], alone["labels"])


def test_preference_truncation(tmp_path):
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    record = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about lists in Python."}],
              "chosen": "Lists are mutable sequences of items.", "rejected": "No."}
    full_prompt, chosen, rejected = encode_preference(tokenizer, record, 0, 0)
    prompt, short_chosen, short_rejected = encode_preference(tokenizer, record, 6, 4)
    assert prompt == full_prompt[-6:] and short_chosen == chosen[:4] and short_rejected == rejected[:4]
    assert tokenizer.decode(chosen) == "Lists are mutable sequences of items.</s>"
    # ultrafeedback style: chosen/rejected repeat the prompt as their first messages
    repeated = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go."}]}
    assert encode_preference(tokenizer, repeated, 0, 0)[1] == encode_preference(tokenizer, {**repeated, "chosen": "Hello."}, 0, 0)[1]
    source = write_jsonl(tmp_path / "pairs.jsonl", [record, {"prompt": "x", "chosen": "same", "rejected": "same"}])
    report = preprocess_chat(str(source), str(tmp_path / "dpo"), str(chat_tokenizer()), kind="dpo",
                             max_prompt_length=6, max_completion_length=4, log=quiet)
    assert (report.documents, report.bad) == (1, 1) and "identical" in report.bad_locations[0]
    pair = PreferenceDataset(MaskedSequences([str(tmp_path / "dpo_text_document")], pairs=True), 128)[0]
    for name, completion in (("chosen", short_chosen), ("rejected", short_rejected)):
        assert pair[name]["input_ids"].tolist() == prompt + completion
        assert pair[name]["labels"].tolist() == [IGNORE_INDEX] * 5 + completion + [IGNORE_INDEX]
    with pytest.raises(DataError, match="holds preference pairs"):
        MaskedSequences([str(tmp_path / "dpo_text_document")], pairs=False)


def test_pairs_identical_after_truncation_are_reported(tmp_path):
    """Completions that differ only beyond --max-completion-length are one sequence twice: such a pair has
    no gradient, its margin is 0 and it counts as never accurate, so it is skipped like an identical pair."""
    record = {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42.", "rejected": "12 + 30 = 52."}
    source = write_jsonl(tmp_path / "pairs.jsonl", [record])
    report = preprocess_chat(str(source), str(tmp_path / "long"), str(chat_tokenizer()), kind="dpo", log=quiet)
    assert (report.documents, report.bad) == (1, 0)
    source = write_jsonl(tmp_path / "pairs.jsonl", [record, record])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: 'chosen' and 'rejected' are identical within "
                                        r"--max-completion-length = 6 tokens"):
        preprocess_chat(str(source), str(tmp_path / "short"), str(chat_tokenizer()), kind="dpo", max_completion_length=6,
                        log=quiet)


def test_truncation_is_reported(tmp_path):
    """--max-length (SFT) and --max-prompt-length / --max-completion-length (DPO) cut silently before:
    the tool now says how many conversations, prompts and completions it cut, and from which side."""
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]}])
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    short = len(encode_conversation(tokenizer, MESSAGES)[0]) - 3  # cuts the last answer, not the short conversation
    assert len(encode_conversation(tokenizer, MESSAGES[1:3])[0]) <= short
    lines = []
    preprocess_chat(str(source), str(tmp_path / "sft"), str(chat_tokenizer()), max_length=short, log=lines.append)
    assert f"Truncated from the right to --max-length = {short} tokens: 1 of 2 conversations." in lines
    lines.clear()
    preprocess_chat(str(source), str(tmp_path / "all"), str(chat_tokenizer()), log=lines.append)
    assert not [line for line in lines if "Truncated" in line]
    record = {"prompt": "Tell me about lists in Python.", "chosen": "Lists are mutable sequences.", "rejected": "No."}
    source = write_jsonl(tmp_path / "pairs.jsonl", [record, {**record, "prompt": "Hi?"}])
    lines.clear()
    preprocess_chat(str(source), str(tmp_path / "dpo"), str(chat_tokenizer()), kind="dpo", max_prompt_length=len(
        encode_preference(tokenizer, {**record, "prompt": "Hi?"}, 0, 0)[0]), max_completion_length=4, log=lines.append)
    assert ("Truncated: 1 of 2 prompts from the left to --max-prompt-length, 2 of 4 completions from the right to "
            "--max-completion-length.") in lines


def test_a_conversation_cut_before_its_first_answer_is_a_bad_record_not_a_sample_without_loss():
    """Cut by --max-length inside its prompt, a conversation has no assistant token left: written, it would
    cost compute and count towards the epochs while training nothing."""
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    messages = [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(BadRecord, match="no trainable token left"):
        encode_conversation(tokenizer, messages, max_length=8)
    assert sum(encode_conversation(tokenizer, messages, assistant_only=False, max_length=8)[1]) == 8  # --loss-on all


def test_a_conversation_or_completion_one_token_over_its_limit_is_cut_to_it():
    """--max-length N keeps at most N tokens, --max-completion-length N at most N of each completion, also
    at N + 1 tokens, and the cut is counted for the tool's report."""
    from collections import Counter

    tokenizer = load_chat_tokenizer(chat_tokenizer())
    ids, _ = encode_conversation(tokenizer, MESSAGES[1:3], assistant_only=False)
    cut = Counter()
    assert encode_conversation(tokenizer, MESSAGES[1:3], assistant_only=False, max_length=len(ids) - 1, cut=cut)[0] == ids[:-1]
    assert encode_conversation(tokenizer, MESSAGES[1:3], assistant_only=False, max_length=len(ids), cut=cut)[0] == ids
    assert cut["conversations"] == 1
    _, chosen, rejected = encode_preference(tokenizer, PAIR, 0, 0)
    assert len(chosen) == len(rejected) and chosen[-1] == tokenizer.eos_token_id
    _, short_chosen, short_rejected = encode_preference(tokenizer, PAIR, 0, len(chosen) - 1, cut)
    assert (short_chosen, short_rejected) == (chosen[:-1], rejected[:-1]) and cut["completions"] == 2


def test_a_template_whose_generation_prompt_is_not_how_it_renders_the_answer_is_refused():
    """The loss mask (SFT) and the prompt/completion split (DPO) go by the length of the prompt's tokens with
    the generation prompt: a template whose generation prompt differs from the start of its assistant turn
    would hide or train the wrong tokens without a word."""
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    old = "'<|start_header_id|>assistant<|end_header_id|>\\n' }}{%- endif %}"
    assert old in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(old, old.replace("\\n'", "\\n\\n'"))
    prompt, conversation = sft_messages({"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5."})
    with pytest.raises(BadRecord, match="tokenizes the prompt differently inside the full conversation"):
        encode_conversation(tokenizer, conversation, prompt=prompt)
    with pytest.raises(BadRecord, match="tokenizes the prompt differently inside the full conversation"):
        encode_preference(tokenizer, PAIR, 0, 0)


def test_missing_chat_data_names_the_chat_tool(tmp_path):
    """A chat prefix that is not there points at the tool that writes chat data, for its kind."""
    for pairs, kind in ((False, "sft"), (True, "dpo")):
        with pytest.raises(DataError, match=rf"nowhere_text_document': missing .*; re-create it with "
                                            rf"data_tools/preprocess_chat.py --kind {kind} or fix the path"):
            MaskedSequences([str(tmp_path / "nowhere_text_document")], pairs=pairs)


def test_validation_scores_every_sample_in_as_many_micro_batches_on_every_rank():
    """min(len(valid), eval_iters x global batch) samples, each rank its strided share in micro-batches;
    a rank with fewer fills up with rows that score nothing (labels all IGNORE_INDEX; a pair: index -1,
    which DPO weighs 0), so every rank runs as many forwards (ZeRO-3 and tensor parallelism gather in
    them) and every layout of one global batch scores the same samples, even fewer than one micro-batch
    per rank. Building the batches draws nothing from torch's global generator (a shifted stream would
    move every later dropout mask of a run that validates)."""
    from doge_dist.config import load_config
    from doge_dist.data.chat_dataset import collate_lm, collate_pairs
    from doge_dist.train.finetune import FinetuneData

    def sample(i):
        return {"input_ids": torch.full((2,), i), "labels": torch.full((2,), i), "position_ids": torch.arange(2)}

    def scored(batches):
        return [[row[0] if row[0] != IGNORE_INDEX else None for row in b["labels"].tolist()] for b in batches]

    samples = [sample(i) for i in range(8)]
    collate = partial(collate_lm, pad_id=0)

    def layout(valid, dp_size, micro, iters=10):
        config = load_config(None, [f"train.micro_batch_size={micro}", "train.max_steps=1", "train.eval_interval=1",
                                    f"train.eval_iters={iters}"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return [scored(FinetuneData(samples, valid, collate, config, rank, dp_size, 0).validation_batches())
                    for rank in range(dp_size)]

    assert layout(samples[:3], 2, 2) == [[[0, 2]], [[1, None]]]
    assert layout(samples[:5], 2, 2) == [[[0, 2], [4, None]], [[1, 3], [None, None]]]
    assert layout(samples[:5], 1, 4) == [[[0, 1, 2, 3], [4, None, None, None]]]
    assert layout(samples[:1], 2, 1) == [[[0]], [[None]]]
    assert layout(samples, 2, 1, iters=1) == [[[0]], [[1]]]  # eval_iters global batches at most
    states = []
    for interval in (0, 1):  # the training DataLoader's iterator draws its seed either way
        torch.manual_seed(0)
        config = load_config(None, ["train.micro_batch_size=2", "train.max_steps=1", f"train.eval_interval={interval}"])
        FinetuneData(samples, samples[:5], collate, config, 0, 1, 0)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
    pairs = [{"chosen": sample(i), "rejected": sample(i + 10), "index": i} for i in range(3)]
    config = load_config(None, ["train.micro_batch_size=2", "train.max_steps=1", "train.eval_interval=1"])
    batch, = FinetuneData(pairs, pairs, partial(collate_pairs, pad_id=0), config, 1, 2, 0).validation_batches()
    assert batch["index"].tolist() == [1, -1] and scored([batch]) == [[1, None, 11, None]]


def test_a_resume_at_a_smaller_global_batch_gets_every_remaining_step():
    """Resumed on 1 rank (2 samples per step) at step 3 of a 2-rank run (4 per step, 12 consumed): the
    epochs were sized max_steps x 2 = 10 samples, fewer than consumed (a ValueError after the engine was
    built). The 2 remaining steps read samples 12 to 15, continuing the epoch order."""
    from doge_dist.config import load_config
    from doge_dist.train.finetune import FinetuneData

    config = load_config(None, ["train.micro_batch_size=2", "train.max_steps=5", "train.eval_interval=0"])
    samples = [{"x": torch.tensor([i])} for i in range(6)]
    collate = lambda batch: {"x": torch.stack([s["x"] for s in batch])}  # noqa: E731
    order = FinetuneData(samples, None, collate, config, dp_rank=0, dp_size=1, consumed_samples=0).train_set
    data = FinetuneData(samples, None, collate, config, dp_rank=0, dp_size=1, consumed_samples=12, step=3)
    steps = [[row for batch in step for row in batch["x"].flatten().tolist()] for step in iter(data.next_step, None)]
    assert steps == [[order[k]["x"].item() for k in (12, 13)], [order[k]["x"].item() for k in (14, 15)]]


def test_preprocess_chat_prints_progress(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}] * 5)
    lines = []
    report = preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), log=lines.append, log_interval=2)
    progress = [line for line in lines if line.startswith("Processed")]
    assert [line.split()[1] for line in progress] == ["2", "4"] and report.documents == 5
    assert "docs/s" in progress[0] and "% of input, ETA" in progress[0]


def test_data_of_the_other_kind_is_refused_and_nothing_written(tmp_path):
    """SFT conversations given to --kind dpo (or all records bad otherwise): an error naming --kind,
    not an empty prefix that only the trainer would refuse."""
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}] * 3)
    with pytest.raises(DataError, match=r"None of the 3 records could be used \(the first: .*chat.jsonl:1: .*is --kind right"):
        preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), kind="dpo", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_columnar_input_without_the_kinds_columns_names_them_and_the_kind_that_fits(tmp_path):
    """A parquet file of pairs given to --kind sft was "this record has keys (none)" for every row; a
    save_to_disk folder of conversations given to --kind dpo a ValueError traceback from ``datasets``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    pq.write_table(pa.table({"prompt": ["2 + 3?"], "chosen": ["5"], "rejected": ["6"]}), tmp_path / "pairs.parquet")
    with pytest.raises(DataError, match=r"pairs\.parquet' has no column 'messages'; it has prompt, chosen, rejected\. "
                                        r"Its columns are dpo data: pass --kind dpo\.$"):
        preprocess_chat(str(tmp_path / "pairs.parquet"), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    Dataset.from_dict({"messages": [MESSAGES]}).save_to_disk(str(tmp_path / "chats"))
    with pytest.raises(DataError, match=r"chats' has no column 'prompt', 'chosen', 'rejected'; it has messages\. "
                                        r"Its columns are sft data: pass --kind sft\.$"):
        preprocess_chat(str(tmp_path / "chats"), str(tmp_path / "out"), str(chat_tokenizer()), kind="dpo", log=quiet)
    Dataset.from_dict({"text": ["prose"]}).save_to_disk(str(tmp_path / "prose"))
    with pytest.raises(DataError, match=r"prose' has no column 'messages'; it has text\. --kind sft reads a 'messages' column"):
        preprocess_chat(str(tmp_path / "prose"), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert not list(tmp_path.glob("out*"))


def test_plain_text_input_is_named(tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("Just prose.\n")
    with pytest.raises(DataError, match=r"notes\.txt: chat data must be jsonl, parquet or a datasets directory"):
        preprocess_chat(str(source), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_explicit_max_steps_wins_over_epochs_and_the_sizing_is_said():
    """``launch/sft.py --config configs/sft_tiny_cpu.yaml train.max_steps=6``: 6 steps, not the 2 epochs
    of the YAML, with the warmup/decay ratios of 6 (as the HF Trainer's max_steps); without a step count
    the epochs size the run. Either way the printed line says so."""
    from doge_dist.config import load_config
    from doge_dist.train.finetune import size_in_epochs, steps_given

    raw = {"train": {"micro_batch_size": 8}, "finetune": {"epochs": 2}}
    overrides = ["train.micro_batch_size=8", "train.max_steps=6"]
    config = load_config(None, overrides)
    line = size_in_epochs(config, 810, 2, steps_given(raw, overrides))
    assert (config.train.max_steps, config.train.warmup_steps, config.train.decay_steps) == (6, 1, 1)  # the ratios of 6
    assert line == ("train.max_steps = 6 as given, which wins over finetune.epochs (0.119 epochs of 810 samples, "
                    "16 per step), warmup 1, decay 1 steps")
    assert steps_given({"train": {"max_steps": 9}}, []) == {"max_steps"} and not steps_given(raw, overrides[:1])
    config = load_config(None, overrides[:1])
    line = size_in_epochs(config, 810, 2, steps_given(raw, overrides[:1]))
    assert (config.train.max_steps, config.train.warmup_steps) == (102, 11)  # ceil(10.2), as the HF Trainer
    assert line == ("train.max_steps = 102 from finetune.epochs = 2 (2.01 epochs of 810 samples, 16 per step), "
                    "warmup 11, decay 10 steps")


def test_explicit_warmup_and_decay_steps_win_over_their_ratios():
    """``train.warmup_steps=50 train.decay_steps=30`` with the epochs' ratios: the ratios replaced them
    without a word. Now what is given is kept (the HF Trainer's warmup_steps over warmup_ratio) and said."""
    from doge_dist.config import load_config
    from doge_dist.train.finetune import size_in_epochs, steps_given

    overrides = ["train.micro_batch_size=8", "train.max_steps=100", "train.warmup_steps=50", "train.decay_steps=30"]
    config = load_config(None, overrides)
    line = size_in_epochs(config, 810, 2, steps_given({"finetune": {"epochs": 2}}, overrides))
    assert (config.train.max_steps, config.train.warmup_steps, config.train.decay_steps) == (100, 50, 30)
    assert line.endswith("warmup 50 (as given), decay 30 (as given) steps")
    assert steps_given({"train": {"warmup_steps": 5}}, ["train.lr=1e-3"]) == {"warmup_steps"}  # the YAML's train section too


def test_epochs_size_the_run_over_data_parallel_ranks_only():
    """Four ranks at tensor parallelism 2 are two data-parallel replicas: a global batch of 16, so 2 epochs of
    810 samples are 102 steps (counting every rank as a replica gave 51: one epoch, without a word)."""
    from doge_dist.config import load_config
    from doge_dist.train.finetune import size_in_epochs, steps_given

    overrides = ["train.micro_batch_size=8", "parallel.tensor_parallel=2"]
    config = load_config(None, overrides)
    line = size_in_epochs(config, 810, 4, steps_given({"finetune": {"epochs": 2}}, overrides))
    assert (config.train.max_steps, config.train.warmup_steps) == (102, 11)
    assert "(2.01 epochs of 810 samples, 16 per step)" in line


def dpo_check(seq_length, valid=None):
    """DPOTask.check (what the launcher runs before building a model) on the test pairs."""
    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.train.dpo import DPOTask

    valid = [f"data.valid_data=[{valid}]"] if valid else []
    config = load_config(None, ["run.init_from=runs/any", f"data.train_data=[{prefixes()['dpo_train']}]",
                                f"data.seq_length={seq_length}"] + valid)
    return DPOTask().check(config)


def test_pairs_cut_to_nothing_by_seq_length_are_reported():
    """DPO pairs whose prompt fills data.seq_length train nothing (reward 0, never accurate): warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dpo_check(128) == 16
    assert not [w for w in caught if "training pairs" in str(w.message)]
    with pytest.warns(UserWarning, match=r"5 of 16 training pairs have a completion wholly beyond data.seq_length = 52 tokens"):
        dpo_check(52)


def test_pairs_all_cut_to_nothing_by_seq_length_are_refused(tmp_path):
    """As for SFT: when no training (or validation) pair has a loss within data.seq_length, every step
    would read loss log 2 with no gradient: the run stops before a model is built, naming the split."""
    with pytest.raises(DataError, match=r"None of the 16 pairs of data.train_data has chosen and rejected completions "
                                        r"that start and differ within data.seq_length = 4 tokens"):
        dpo_check(4)
    long_prompt = {"prompt": "Tell me about lists. " * 40, "chosen": "Lists hold items.", "rejected": "No."}
    preprocess_chat(str(write_jsonl(tmp_path / "valid.jsonl", [long_prompt] * 2)), str(tmp_path / "valid"),
                    str(chat_tokenizer()), kind="dpo", max_prompt_length=0, max_completion_length=0, log=quiet)
    with pytest.raises(DataError, match=r"None of the 2 pairs of data.valid_data .* data.seq_length = 128 tokens"):
        dpo_check(128, valid=tmp_path / "valid_text_document")


def test_conversations_longer_than_seq_length_are_reported():
    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.train.finetune import SFTTask

    def check(seq_length):
        config = load_config(None, ["run.init_from=runs/any", f"data.train_data=[{prefixes()['sft_train']}]",
                                    f"data.seq_length={seq_length}"])
        return SFTTask().check(config)

    lengths = SFTTask().sequences(load_config(None, [f"data.train_data=[{prefixes()['sft_train']}]"]), "train").lengths
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(int(lengths.max()))
    assert not [w for w in caught if "longer than data.seq_length" in str(w.message)]
    shorter = int(lengths.max()) - 1  # cuts the longest; 16 would leave no assistant token at all (refused)
    longer = int((lengths > shorter).sum())
    assert 0 < longer
    with pytest.warns(UserWarning, match=rf"{longer} of {len(lengths)} training conversations are longer than data.seq_length = {shorter} "
                                         r"tokens: their tokens beyond it are not trained on \(0 have no assistant token left\)"):
        check(shorter)


def test_conversations_cut_to_nothing_by_seq_length_are_refused():
    """A data.seq_length shorter than every conversation's prompt leaves no assistant token: the run
    would train nothing and report loss 0 and perplexity 1.00, so it stops before starting."""
    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.data.chat_dataset import conversations_without_loss
    from doge_dist.train.finetune import SFTTask

    config = load_config(None, ["run.init_from=runs/any", f"data.train_data=[{prefixes()['sft_train']}]",
                                f"data.valid_data=[{prefixes()['sft_valid']}]", "data.seq_length=4"])
    with pytest.raises(DataError, match=r"None of the 32 conversations of data.train_data has an assistant token within data.seq_length = 4"):
        SFTTask().check(config)
    sequences = SFTTask().sequences(config, "train")
    assert conversations_without_loss(sequences, 4) == 32
    assert conversations_without_loss(sequences, int(sequences.lengths.max())) == 0


def test_options_of_the_other_kind_are_refused():
    result = subprocess.run([PYTHON, "data_tools/preprocess_chat.py", "--kind", "dpo", "--input", "x.jsonl", "--tokenizer",
                             "t", "--output-prefix", "o", "--loss-on", "all"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 2 and "--loss-on applies to --kind sft, not dpo" in result.stderr


def test_dpo_length_limits_of_0_keep_everything(tmp_path):
    """--max-prompt-length 0 / --max-completion-length 0 mean no limit (as --max-length 0), not the
    default 512; a negative limit is refused."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    words = " ".join(["word"] * 700)
    source = write_jsonl(tmp_path / "long.jsonl", [{"prompt": words, "chosen": "yes " + words, "rejected": "no"}])

    def preprocess(*limits):
        return subprocess.run([PYTHON, "data_tools/preprocess_chat.py", "--kind", "dpo", "--input", str(source), "--tokenizer",
                               str(chat_tokenizer()), "--output-prefix", str(tmp_path / "out"), *limits],
                              cwd=REPO, env=env(), capture_output=True, text=True)

    assert preprocess("--max-prompt-length", "0", "--max-completion-length", "0").returncode == 0
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    prompt, chosen, _ = encode_preference(tokenizer, {"prompt": words, "chosen": "yes " + words, "rejected": "no"}, 0, 0)
    assert len(prompt) > 512 and len(chosen) > 512
    stored = len(IndexedDataset(str(tmp_path / "out_text_document"))[0])  # prompt + chosen
    assert stored == len(prompt) + len(chosen)
    refused = preprocess("--max-completion-length", "-1")
    assert refused.returncode == 2 and "--max-completion-length must be 0 (no limit) or a positive number" in refused.stderr


def test_a_failed_write_keeps_the_old_tokens_and_mask_together(tmp_path, monkeypatch):
    """Tokens and loss mask are one dataset: a write that fails on the second index (a full disk)
    leaves both old files as they were, not a new mask beside the old tokens."""
    import errno

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "sft")
    preprocess_chat(str(write_jsonl(tmp_path / "old.jsonl", [{"messages": MESSAGES}])), prefix, str(chat_tokenizer()), log=quiet)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("sft_*")}
    finalize, calls = IndexedDatasetBuilder.finalize, []

    def finalize_then_fill_the_disk(builder, idx_path):
        calls.append(idx_path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        finalize(builder, idx_path)

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", finalize_then_fill_the_disk)
    new = write_jsonl(tmp_path / "new.jsonl", [{"messages": MESSAGES[1:3]}] * 2)
    with pytest.raises((DataError, OSError)) as error:
        preprocess_chat(str(new), prefix, str(chat_tokenizer()), log=quiet)
    assert len(calls) == 2 and {p.name: p.read_bytes() for p in tmp_path.glob("sft_*")} == before
    assert isinstance(error.value, DataError) and "files already there are untouched" in str(error.value)


def test_a_kill_while_renaming_never_pairs_new_tokens_with_an_old_mask(tmp_path, monkeypatch):
    """The files were renamed prefix by prefix: a kill after the new tokens' index but before the mask's
    left new tokens beside the old mask, both complete and of equal lengths, which training loaded (a
    re-run with --loss-on all trained on the old assistant-only mask). Now every old index goes first and
    the new ones come last: the pair is refused until a run completes."""
    from pathlib import Path

    prefix = str(tmp_path / "sft")
    source = write_jsonl(tmp_path / "data.jsonl", [{"messages": MESSAGES}] * 2)
    preprocess_chat(str(source), prefix, str(chat_tokenizer()), log=quiet)
    unlink = Path.unlink

    def killed_at_the_old_mask_index(path, *args, **kwargs):
        if path.name == "sft_loss_mask_document.idx":
            raise KeyboardInterrupt
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_at_the_old_mask_index)
    with pytest.raises(KeyboardInterrupt):
        preprocess_chat(str(source), prefix, str(chat_tokenizer()), assistant_only=False, log=quiet)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"sft_text_document\.idx"):
        MaskedSequences([prefix + "_text_document"], pairs=False)


def test_a_tokenizer_without_chat_template_is_refused_before_training():
    """data.tokenizer is exported with the fine-tuned model: the pretraining twin (no chat template)
    would give an export that apply_chat_template and generate.py --chat cannot prompt."""
    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.train.finetune import SFTTask

    def check(tokenizer):
        return SFTTask().check(load_config(None, ["run.init_from=runs/any", f"data.train_data=[{prefixes()['sft_train']}]",
                                                  f"data.tokenizer={tokenizer}"]))

    assert check(chat_tokenizer()) > 0
    with pytest.raises(DataError, match=r"data.tokenizer: Tokenizer .* has no chat template"):
        check(chat_tokenizer().parent)


def test_chat_data_with_ids_beyond_the_model_vocabulary_is_refused_before_training(tmp_path):
    """As pretraining data is: SFT/DPO data tokenized with another tokenizer failed in the first step's
    embedding (IndexError on CPU, a device-side assert on CUDA) after the model was built."""
    import shutil

    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.data.indexed import validate_prefix
    from doge_dist.data.preprocess_chat import mask_prefix
    from doge_dist.train.finetune import SFTTask

    source = prefixes()["sft_valid"]
    copy = str(tmp_path / "other_tokenizer_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(source + ext, copy + ext)
        shutil.copy(mask_prefix(source) + ext, mask_prefix(copy) + ext)
    tokens = np.memmap(copy + ".bin", dtype=validate_prefix(copy).dtype, mode="r+")
    assert tokens.max() < 512 and tokens.dtype == np.uint16
    tokens[3] = 600  # the test tokenizer and doge-tiny have 512 ids
    tokens.flush()

    def check(valid):
        return SFTTask().check(load_config(None, ["run.init_from=runs/any", "model.preset=doge-tiny",
                                                  f"data.train_data=[{prefixes()['sft_train']}]",
                                                  f"data.valid_data=[{valid}]", f"data.tokenizer={chat_tokenizer()}"]))

    assert check(source) > 0
    with pytest.raises(DataError, match=rf"'{copy}.bin' holds token id 600 but the tokenizer/model vocabulary has 512 ids"):
        check(copy)


def test_padding_stays_out_of_the_moe_balance_loss_and_routing_statistics():
    """Fine-tuning batches are right-padded; as transformers (given the attention mask) the balance
    loss and moe/* count only the real tokens: collate_lm's token_mask reaches both through the
    trainer's forward_loss, and the attention of the real tokens does not change."""
    from doge_dist.config import ModelConfig
    from doge_dist.data.chat_dataset import collate_lm
    from doge_dist.model import build_model
    from doge_dist.model.moe_stats import MoEStats
    from doge_dist.train.loop import forward_loss

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny-moe"))
    samples = [{"input_ids": torch.randint(3, 500, (n,)), "labels": torch.randint(3, 500, (n,)),
                "position_ids": torch.arange(n)} for n in (20, 64)]
    batch = collate_lm(samples, pad_id=2)
    assert batch["token_mask"].sum(1).tolist() == [20, 64]

    class Engine:  # what forward_loss asks of DeepSpeed's engine
        module = model

        def zero_optimization_partition_weights(self):
            return False

        def __call__(self, *args, **kwargs):
            return model(*args, **kwargs)

    stats = MoEStats(model.config.num_experts)
    _, _, balance = forward_loss(Engine(), batch, stats)
    stats.end_step()
    masked = model(batch["input_ids"], attention_mask=batch["token_mask"], position_ids=batch["position_ids"])
    unmasked = model(batch["input_ids"], position_ids=batch["position_ids"])
    assert balance.item() == pytest.approx(masked.balance_loss.item(), rel=1e-6)
    assert abs(balance.item() - unmasked.balance_loss.item()) > 1e-3
    routed = stats.window[-1].sum(-1)  # per layer: (token, slot) assignments counted
    assert routed.tolist() == [84.0 * model.config.num_experts_per_tok] * model.config.num_hidden_layers


def test_a_sequence_parallel_rank_counts_its_chunk_of_the_token_mask(monkeypatch):
    from doge_dist.train import loop

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    assert loop.local_tokens(mask, routed=12) is mask
    monkeypatch.setattr(loop.parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(loop.parallel_state, "get_tensor_model_parallel_rank", lambda: 1)
    assert loop.local_tokens(mask, routed=6).tolist() == [[1, 1, 0], [0, 0, 0]]  # rank 1: the second half of each row


def test_a_template_with_only_a_generation_prompt_is_refused(tmp_path):
    """The loss mask needs {% generation %} markers; "add_generation_prompt" alone contains the word
    and passed the check, leaving every assistant token out of the loss."""
    import shutil

    copy = tmp_path / "tokenizer"
    shutil.copytree(chat_tokenizer(), copy)
    unmarked = ("{%- for message in messages %}{{- message['content'] + eos_token }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    tokenizer = AutoTokenizer.from_pretrained(str(copy))
    tokenizer.chat_template = unmarked
    tokenizer.save_pretrained(str(copy))
    assert AutoTokenizer.from_pretrained(str(copy)).chat_template == unmarked
    load_chat_tokenizer(chat_tokenizer())
    with pytest.raises(DataError, match=r"has no chat template with \{% generation %\} markers"):
        load_chat_tokenizer(copy)


def test_make_chat_tokenizer_never_deletes_its_source_or_other_files(tmp_path):
    """The tool replaced --output-dir whole: pointed at the tokenizer's own directory (or a folder above
    it) it deleted the sentencepiece model, the pretraining twin and everything else there; pointed at an
    exported model (which has a tokenizer_config.json) it deleted the weights. Such an output, or an
    existing directory that is no tokenizer, is refused with nothing touched."""
    import shutil

    from doge_dist.data.chat_template import write_chat_tokenizer

    source = tmp_path / "data" / "tokenizer"
    shutil.copytree(chat_tokenizer().parent, source)
    other = tmp_path / "data" / "sft_train.jsonl"
    other.write_text("{}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for output in (source, tmp_path / "data", tmp_path):
        with pytest.raises(DataError, match=rf"--output-dir '{output}' holds the source tokenizer"):
            write_chat_tokenizer(source / "tokenizer.model", output)
    with pytest.raises(DataError, match=rf"--output-dir '{tmp_path / 'data'}' exists and is not a tokenizer directory"):
        write_chat_tokenizer(chat_tokenizer().parent / "tokenizer.model", tmp_path / "data")
    model = tmp_path / "hf"  # an exported model: a tokenizer directory too, with the weights beside it
    shutil.copytree(chat_tokenizer(), model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=rf"--output-dir '{model}' holds a model \(config.json, model.safetensors\)"):
        write_chat_tokenizer(source / "tokenizer.model", model)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    written = write_chat_tokenizer(source / "tokenizer.model", source / "chat")  # an old chat twin is replaced
    assert load_chat_tokenizer(written).chat_template


def test_a_missing_init_from_is_named_by_its_key(tmp_path):
    """SFT/DPO read the model shape from run.init_from before the other checks: a path that is not there,
    or a run directory not trained yet, was reported without the key that names it."""
    from doge_dist.config import ConfigError
    from doge_dist.train.finetune import model_config_of

    with pytest.raises(ConfigError, match=r"run.init_from = '.*missing' does not exist"):
        model_config_of(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"run.init_from = '.*' holds no doge-dist checkpoint"):
        model_config_of(str(tmp_path))


def test_model_overrides_apply_on_top_of_the_init_from_model():
    """A YAML without a model section fine-tunes run.init_from's model; a model.* override such as
    model.attn_backend=eager changes that model, where it made ModelConfig's defaults (32,768 ids, 32
    layers) and the run stopped on a vocabulary mismatch naming the wrong key. model.preset=... names
    another shape outright (planning a model before init_from exists)."""
    from chat_helpers import init_dir
    from doge_dist.config import ConfigError, ModelConfig, load_config
    from doge_dist.config import inherits_model
    from doge_dist.train.finetune import continued_model

    overrides = [f"run.init_from={init_dir()}", "model.attn_backend=eager", "model.max_position_embeddings=4096"]
    config = load_config(None, overrides)
    assert inherits_model(config.run.init_from, {}, overrides)
    model = continued_model(config.run.init_from, overrides)
    tiny = ModelConfig.from_preset("doge-tiny")
    assert model.fields_differing_from(tiny) == ["max_position_embeddings", "attn_backend"]
    assert (model.attn_backend, model.max_position_embeddings) == ("eager", 4096)
    assert not inherits_model(config.run.init_from, {"model": {"preset": "doge-20m"}}, overrides)
    assert not inherits_model(config.run.init_from, {}, overrides + ["model.preset=doge-20m"])
    # a MoE key on the dense model it continues would be ignored: named, as without init_from
    with pytest.raises(ConfigError, match=r"model.num_experts is set in the command-line overrides, but the model "
                                          r"\(run.init_from's\) is dense"):
        continued_model(config.run.init_from, overrides + ["model.num_experts=16"])


def test_pairs_identical_within_seq_length_count_as_without_loss():
    """Chosen and rejected that differ only beyond data.seq_length train nothing (margin 0), as a
    completion cut away wholly does; positions 0 .. seq_length - 1 predict tokens up to seq_length."""
    from doge_dist.data.chat_dataset import pairs_without_loss

    mask = np.array([0, 0, 0, 1, 1, 1])
    pair = [(np.array([0, 5, 6, 7, 8, 1]), mask), (np.array([0, 5, 6, 7, 9, 1]), mask)]  # they differ at token 4
    assert [pairs_without_loss(pair, seq_length) for seq_length in (2, 3, 4, 5)] == [1, 1, 0, 0]


def test_the_sample_chat_validation_sets_are_held_out(tmp_path):
    """make demo validates SFT and DPO on sft_valid/dpo_valid: drawn from the same templates as the
    training sets, 11 of 64 validation conversations and 32 of 64 preference prompts were training
    ones, so val/loss and dpo_val/* measured memory, not generalisation."""
    import json

    from doge_dist.data.sample_chat import build_sample_chat

    counts = build_sample_chat(tmp_path)

    def records(name):
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    assert counts == {"sft_train.jsonl": 2000, "sft_valid.jsonl": 64, "dpo_train.jsonl": 1000, "dpo_valid.jsonl": 64}
    train = {json.dumps(r) for r in records("sft_train.jsonl")}
    assert len(records("sft_valid.jsonl")) == 64 and not train & {json.dumps(r) for r in records("sft_valid.jsonl")}
    prompts = {r["prompt"] for r in records("dpo_train.jsonl")}
    assert len(records("dpo_valid.jsonl")) == 64 and not prompts & {r["prompt"] for r in records("dpo_valid.jsonl")}


def test_a_directory_of_several_splits_is_refused_and_nothing_written(tmp_path):
    """A Hugging Face Hub download (data/train-00000-of-00001.parquet beside data/test-..., or train/ beside
    validation/) was read whole: the held-out split trained on, silently (as a DatasetDict folder, refused)."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from doge_dist.data.inputs import list_inputs

    table = pa.table({"messages": [MESSAGES]})
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(table, hub / f"{split}-00000-of-00001.parquet")
    with pytest.raises(DataError, match=re.escape(f"'{tmp_path / 'hub'}' holds several splits (test, train); reading it "
                                                  f"whole would mix them. Pass one split's files, for example --input '{hub}/train*'.")):
        preprocess_chat(str(tmp_path / "hub"), str(tmp_path / "out"), str(chat_tokenizer()), log=quiet)
    assert not list(tmp_path.glob("out*"))
    assert preprocess_chat(f"{hub}/train*", str(tmp_path / "out"), str(chat_tokenizer()), log=quiet).documents == 1
    folders = tmp_path / "folders"
    for split in ("train", "validation"):
        (folders / split).mkdir(parents=True)
        pq.write_table(table, folders / split / "0000.parquet")
    with pytest.raises(DataError, match=re.escape(f"holds several splits (train, validation); reading it whole would mix "
                                                  f"them. Pass one split's files, for example --input '{folders / 'train'}'.")):
        list_inputs(folders)
    assert len(list_inputs([folders / "train", folders / "validation"])) == 2  # each given on its own: as asked


def test_prompt_completion_records_train_on_the_completion_only(tmp_path):
    """TRL's prompt-completion SFT format was refused ("no key 'messages'"); as TRL's completion_only_loss
    the loss is on the completion alone (its content and eos): a one-turn record, as messages or strings,
    equals its messages form, and a multi-turn prompt's assistant turns carry no loss."""
    question, answer = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    records = [{"prompt": [question], "completion": [answer]}, {"prompt": "Q", "completion": "A"},
               {"messages": [question, answer]}, {"prompt": MESSAGES[:4], "completion": MESSAGES[4:]},
               {"prompt": "Q", "chosen": "A", "rejected": "B"}]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    report = preprocess_chat(str(source), str(tmp_path / "sft"), str(chat_tokenizer()), log=quiet)
    assert (report.documents, report.bad) == (4, 1)
    assert "no key 'messages' (nor 'prompt' and 'completion'); this record has keys 'prompt', 'chosen'" in report.bad_locations[0]
    sequences = MaskedSequences([str(tmp_path / "sft_text_document")], pairs=False)
    documents = [(ids.tolist(), mask.tolist()) for ids, mask in (sequences[i] for i in range(len(sequences)))]
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    trained = [tokenizer.decode([i for i, m in zip(ids, mask) if m]) for ids, mask in documents]
    assert trained == ["A</s>", "A</s>", "A</s>", "4 * 4 = 16.</s>"]
    assert documents[0] == documents[1] == documents[2]
    assert documents[3][0] == encode_conversation(tokenizer, MESSAGES)[0]
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["Q"], "completion": ["A"]}).save_to_disk(str(tmp_path / "saved"))  # columns of one format
    preprocess_chat(str(tmp_path / "saved"), str(tmp_path / "columns"), str(chat_tokenizer()), log=quiet)
    assert MaskedSequences([str(tmp_path / "columns_text_document")], pairs=False)[0][0].tolist() == documents[0][0]


def test_tool_turns_are_context_after_an_assistant_turn():
    """A tool result (role tool, or ipython as Llama 3 and the published Doge template name it) made the
    conversation a bad record; it is rendered by the template and carries no loss, as a user turn."""
    from doge_dist.data.chat import check_messages
    tokenizer = load_chat_tokenizer(chat_tokenizer())
    for role in ("tool", "ipython"):
        messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "get_weather(Paris)"},
                    {"role": role, "content": "18 C, sunny"}, {"role": "assistant", "content": "It is 18 C and sunny."}]
        ids, mask = encode_conversation(tokenizer, check_messages(messages))
        spans = [bit for index, bit in enumerate(mask) if bit and (index == 0 or not mask[index - 1])]
        assert len(spans) == 2 and tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "get_weather(Paris)</s>It is 18 C and sunny.</s>"
        assert f"{role}<|end_header_id|>\n18 C, sunny</s>" in tokenizer.decode(ids)
        with pytest.raises(BadRecord, match=rf"message 2 is '{role}' where 'assistant' belongs"):
            check_messages([messages[0], messages[2], messages[3]])  # a tool result answers an assistant's call


def test_an_empty_system_message_is_dropped_not_the_conversation():
    """Many datasets write "no system prompt" as an empty system message: the conversation was a bad record."""
    from doge_dist.data.chat import check_messages, preference_messages
    empty = {"role": "system", "content": " "}
    assert check_messages([empty] + MESSAGES[1:]) == MESSAGES[1:]
    assert preference_messages({"prompt": [empty, MESSAGES[1]], "chosen": "5.", "rejected": "6."})[0] == MESSAGES[1:2]
    with pytest.raises(BadRecord, match="'prompt' holds only an empty system message"):
        preference_messages({"prompt": [empty], "chosen": "5.", "rejected": "6."})
    with pytest.raises(BadRecord, match=r"message 2 \(user\) has empty content"):
        check_messages([empty, {"role": "user", "content": ""}, MESSAGES[2]])


def finetune_check(*overrides: str) -> int:
    """SFTTask.check (what the launcher runs before building a model) on the test conversations."""
    from chat_helpers import prefixes
    from doge_dist.config import load_config
    from doge_dist.train.finetune import SFTTask

    return SFTTask().check(load_config(None, ["run.init_from=runs/any", f"data.train_data=[{prefixes()['sft_train']}]", *overrides]))


def test_validation_without_valid_data_and_a_split_are_refused():
    """Chat data is read whole: train.eval_interval > 0 without data.valid_data never validated, silently
    (data.split=100,0,0 gave pretraining's advice "a split like 969,30,1", which does nothing here)."""
    from chat_helpers import prefixes
    from doge_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"^train.eval_interval > 0 but data.valid_data is empty: SFT/DPO chat data is "
                                          r"not split by data.split; .* or set train.eval_interval=0\.$"):
        finetune_check("train.eval_interval=10")
    with pytest.raises(ConfigError, match=r"^data.split = '100,0,0' does nothing for SFT/DPO: chat data is not split"):
        finetune_check("data.split=100,0,0")
    assert finetune_check("train.eval_interval=10", f"data.valid_data=[{prefixes()['sft_valid']}]") > 0


def test_the_finetuning_recipes_pass_the_split_checks():
    """configs/sft_*.yaml and dpo_*.yaml: those that validate list data.valid_data, none sets data.split."""
    from pathlib import Path

    from doge_dist.config import load_config
    from doge_dist.train.finetune import check_no_split

    recipes = [*Path(REPO, "configs").glob("sft_*.yaml"), *Path(REPO, "configs").glob("dpo_*.yaml")]
    assert len(recipes) == 6
    for recipe in recipes:
        check_no_split(load_config(str(recipe)))


def test_a_warmup_longer_than_the_epochs_is_named_alone():
    """train.warmup_steps=150 over a 2-epoch run of 102 steps: the decay was sized 102 - 150 = -48 and the
    error named train.decay_steps (-48), which the user never set."""
    from doge_dist.config import ConfigError, load_config
    from doge_dist.train.finetune import size_in_epochs, steps_given
    from doge_dist.train.schedule import check_schedule

    overrides = ["train.micro_batch_size=8", "train.warmup_steps=150"]
    config = load_config(None, overrides)
    size_in_epochs(config, 810, 2, steps_given({"finetune": {"epochs": 2}}, overrides))
    assert (config.train.max_steps, config.train.warmup_steps, config.train.decay_steps) == (102, 150, 0)
    with pytest.raises(ConfigError, match=r"train.warmup_steps \(150\) \+ train.decay_steps \(0\) must be non-negative "
                                          r"and fit in train.max_steps \(102\)"):
        check_schedule(config.train)


def test_a_decay_ratio_given_with_the_cosine_scheduler_is_refused():
    """finetune.decay_ratio sizes only the wsd decay: given with cosine (the recipes' scheduler) it would be
    ignored without a word; its default is not a given value."""
    from doge_dist.config import ConfigError, load_config
    from doge_dist.train.finetune import check_decay_ratio

    cosine = load_config(None, ["train.scheduler=cosine"])
    with pytest.raises(ConfigError, match=r"finetune.decay_ratio sizes the wsd scheduler's decay, and train.scheduler = "
                                          r"'cosine' .*remove finetune.decay_ratio, or set train.scheduler=wsd"):
        check_decay_ratio(cosine, {"finetune": {"decay_ratio": 0.2}}, [])
    with pytest.raises(ConfigError, match="finetune.decay_ratio"):
        check_decay_ratio(cosine, {}, ["finetune.decay_ratio=0.2"])
    check_decay_ratio(cosine, {"finetune": {"epochs": 2}}, [])
    check_decay_ratio(load_config(None, []), {"finetune": {"decay_ratio": 0.2}}, [])  # wsd uses it
