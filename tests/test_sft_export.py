"""An SFT run exported with launch/export_hf.py carries the chat template: AutoTokenizer's
apply_chat_template gives the ids the run trained on, and transformers' generate runs from it;
launch/generate.py --chat replies as transformers does, from the run or from the export."""
import dataclasses
import functools
import subprocess

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_helpers import chat_tokenizer, single_run
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import save_hf
from doge_dist.model import build_model
from doge_dist.data.chat import encode_conversation
from doge_dist.data.chat_template import DOGE_CHAT_TEMPLATE, load_chat_tokenizer
from doge_dist.train.export import load_checkpoint_model
from train_helpers import PYTHON, REPO, concurrently, env, scratch

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7."}]


def test_exported_sft_model_chats_in_transformers():
    output = scratch() / "hf_sft"
    result = subprocess.run([PYTHON, "launch/export_hf.py", "--checkpoint", str(single_run("sft")), "--output", str(output)],
                            cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == DOGE_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"] == \
        encode_conversation(load_chat_tokenizer(output), MESSAGES)[0]

    model = AutoModelForCausalLM.from_pretrained(output, attn_implementation="eager").eval()
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|start_header_id|>assistant<|end_header_id|>\n")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    with torch.no_grad():  # the exported weights are the fine-tuned ones
        ours = load_checkpoint_model(single_run("sft")).eval()(prompt["input_ids"]).logits
        assert torch.allclose(model(prompt["input_ids"]).logits, ours, atol=1e-4, rtol=1e-4)

    # launch/generate.py --chat replies as transformers does: from the export and from the run (this
    # briefly trained model answers with spaces), and from a random model whose larger weights make
    # its greedy reply varied text (at the usual 0.02 it answers with newlines)
    exported = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    torch.manual_seed(0)
    varied = save_hf(build_model(dataclasses.replace(ModelConfig.from_preset("doge-tiny"), initializer_range=0.2)),
                     scratch() / "hf_varied", tokenizer=chat_tokenizer())
    expected = ((output, exported), (single_run("sft"), exported), (varied, _transformers_reply(varied, MESSAGES[0]["content"], 6)))
    results = concurrently(*(  # three independent commands, at the same time
        functools.partial(subprocess.run, [PYTHON, "launch/generate.py", "--model", str(source), "--chat", "--prompt",
                                           MESSAGES[0]["content"], "--temperature", "0", "--max_new_tokens", "6"],
                          cwd=REPO, env=env(), capture_output=True, text=True) for source, _ in expected))
    for (source, reply), result in zip(expected, results):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout == reply + "\n", (source, reply, result.stdout[-300:])  # the reply alone: loading talks on stderr
    assert len(set(reply.strip())) > 3


def _transformers_reply(directory, question: str, new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
