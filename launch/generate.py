#!/usr/bin/env python
"""Sample text from a run (latest checkpoint) or a Hugging Face Doge directory.

    python launch/generate.py --model runs/doge_tiny_cpu --prompt "The list" --max_new_tokens 60
    python launch/generate.py --model hf/doge_tiny_cpu --temperature 0
    python launch/generate.py --model runs/sft_tiny_cpu --chat --prompt "What is a list?"

--chat sends the prompt as a user turn through the tokenizer's chat template (an SFT/DPO run's
data.tokenizer, or an export of one) and prints the assistant's reply.
"""
import argparse
import contextlib
import sys
from pathlib import Path

from doge_dist.train.cli import check_generator_seed, report_errors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory or Hugging Face Doge directory")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="default: the HF directory's, or the run's data.tokenizer")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn of the chat template")
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step as one compiled graph: several times faster per token after a "
                             "compile of about 20 s (for long outputs; within the model's keep_window_size)")
    args = parser.parse_args()
    try:
        from doge_dist.model.generate import check_options

        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        check_generator_seed(args.seed)
    except ValueError as error:
        parser.error(str(error))

    def run() -> None:
        import torch

        from doge_dist.data import DataError, load_tokenizer
        from doge_dist.model.generate import generate, untrained_positions_note

        with contextlib.redirect_stdout(sys.stderr):  # loading messages (DeepSpeed's too): stdout is the text alone
            from doge_dist.data.chat import chat_ids
            from doge_dist.data.chat_template import load_chat_tokenizer
            from doge_dist.train.export import check_tokenizer_fits, known_tokenizer_path, load_checkpoint_model
            from doge_dist.train.finetune import model_config_of

            # the tokenizer and its chat template first: a wrong one is named before a checkpoint is consolidated
            hf_directory = (Path(args.model) / "config.json").is_file()
            tokenizer_path = args.tokenizer or (args.model if hf_directory else known_tokenizer_path(args.model))
            try:
                tokenizer = load_tokenizer(tokenizer_path)
            except DataError as error:
                if args.tokenizer:
                    raise
                raise DataError(f"{error} Or pass this model's tokenizer with --tokenizer.") from None
            chat = load_chat_tokenizer(tokenizer_path, for_training=False) if args.chat else None
            check_tokenizer_fits(tokenizer, tokenizer_path, model_config_of(args.model, "--model").vocab_size)
            if hf_directory:
                from doge_dist.convert.hf import load_hf

                model = load_hf(args.model)
            else:
                model = load_checkpoint_model(args.model)
        if args.chat:  # the reply alone; encoded as SFT data was (a literal "</s>" in the prompt stays text)
            prompt = chat_ids(chat, [{"role": "user", "content": args.prompt}], add_generation_prompt=True)[0]
            shown = len(prompt)
        else:  # the prompt and its continuation; documents start after an end-of-document token
            prompt, shown = [tokenizer.eod_id] + tokenizer.encode(args.prompt), 1
        note = untrained_positions_note(model.config, len(prompt), args.max_new_tokens)
        if note:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        out = generate(model, torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       tokenizer.eos_id, torch.Generator().manual_seed(args.seed), compile=args.compile,
                       vocab_limit=tokenizer.vocab_size)  # a padded vocabulary's extra ids decode to nothing
        text = out[0, shown:].tolist()
        print(chat.decode(text, skip_special_tokens=True) if args.chat else tokenizer.decode(text))

    sys.exit(report_errors(run))
