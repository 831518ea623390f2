r"""Dense -> sparse continuation: turn a dense Doge (a run directory, checkpoint or Hugging Face
directory) into the CDMoE model of the same shape, written as a Hugging Face directory that
pretraining starts from.

    python launch/upcycle.py --checkpoint runs/doge_20m --preset doge-20m-moe --output runs/doge_20m_moe_init
    deepspeed launch/pretrain.py --config configs/doge_20m_moe.yaml run.init_from=runs/doge_20m_moe_init \
        train.freeze_dense_steps=800

A dense model whose shape is not a preset's takes the same model.key=value overrides as its training
config, e.g. the demo run of configs/doge_tiny_cpu.yaml:

    python launch/upcycle.py --checkpoint runs/doge_tiny_cpu --preset doge-tiny-moe --output runs/doge_tiny_moe_init \
        model.vocab_size=8192 model.hidden_size=256 model.intermediate_size=512 model.num_hidden_layers=4
"""
import argparse
import sys

from doge_dist.train.cli import check_generator_seed, report_errors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="dense run dir, checkpoint dir, or HF Doge directory")
    parser.add_argument("--preset", required=True, help="MoE preset of the same shape, e.g. doge-20m-moe")
    parser.add_argument("--output", required=True, help="directory for the MoE model (Hugging Face format)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new router and expert tables")
    parser.add_argument("--tokenizer", default=None, help="tokenizer written into --output (default: the HF directory's "
                        "own, or data.tokenizer from the run's config.yaml)")
    parser.add_argument("overrides", nargs="*", help="model.key=value changes to the preset, e.g. model.vocab_size=8192")
    args = parser.parse_intermixed_args()
    try:
        check_generator_seed(args.seed)
    except ValueError as error:
        parser.error(str(error))

    def run() -> None:
        from doge_dist.convert.upcycle import upcycle_to_hf

        output = upcycle_to_hf(args.checkpoint, args.preset, args.output, args.step, args.seed, args.overrides,
                               args.tokenizer)
        print(f"wrote {output}")

    sys.exit(report_errors(run))
