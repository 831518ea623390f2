#!/usr/bin/env python
"""Export a pretraining checkpoint (any ZeRO stage) as a Hugging Face Doge directory with its tokenizer.

    python launch/export_hf.py --checkpoint runs/doge_20m --output hf/doge_20m [--step 8000]

The result loads with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained (no remote code).
"""
import argparse
import sys

from doge_dist.train.cli import report_errors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or one step directory")
    parser.add_argument("--step", type=int, default=None, help="a kept step (default: the latest)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None, help="default: data.tokenizer from the run's config.yaml")
    args = parser.parse_args()

    def run() -> None:
        from doge_dist.train.export import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.output, args.step, args.tokenizer)}")

    sys.exit(report_errors(run))
