#!/usr/bin/env python
"""Sample text from a pretraining run (latest checkpoint) or a Hugging Face Doge directory.

    python launch/generate.py --model runs/doge_tiny_cpu --prompt "The list" --max_new_tokens 60
    python launch/generate.py --model hf/doge_tiny_cpu --temperature 0
"""
import argparse
import sys
from pathlib import Path

from doge_dist.train.cli import report_errors

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
    args = parser.parse_args()

    def run() -> None:
        import torch

        from doge_dist.data import load_tokenizer
        from doge_dist.model.generate import generate

        if (Path(args.model) / "config.json").is_file():
            from doge_dist.convert.hf import load_hf

            model, tokenizer_path = load_hf(args.model), args.tokenizer or args.model
        else:
            from doge_dist.train.export import load_checkpoint_model, run_tokenizer_path

            model, tokenizer_path = load_checkpoint_model(args.model), args.tokenizer or run_tokenizer_path(args.model)
        tokenizer = load_tokenizer(tokenizer_path)
        prompt = [tokenizer.eod_id]  # training documents start after an end-of-document token
        ids = torch.tensor([prompt + tokenizer.encode(args.prompt)])
        out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       tokenizer.eos_id, torch.Generator().manual_seed(args.seed))
        print(tokenizer.decode(out[0, len(prompt):].tolist()))

    sys.exit(report_errors(run))
