"""Dense -> sparse continuation: turn a dense Doge (a run directory, checkpoint or Hugging Face
directory) into the CDMoE model of the same shape, written as a Hugging Face directory that
pretraining starts from.

    python launch/upcycle.py --checkpoint runs/doge_20m --preset doge-20m-moe --output runs/doge_20m_moe_init
    deepspeed launch/pretrain.py --config configs/doge_20m_moe.yaml run.init_from=runs/doge_20m_moe_init \
        train.freeze_dense_steps=500
"""
import argparse
import sys

from doge_dist.convert.upcycle import upcycle_to_hf

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="dense run dir, checkpoint dir, or HF Doge directory")
    parser.add_argument("--preset", required=True, help="MoE preset of the same shape, e.g. doge-20m-moe")
    parser.add_argument("--output", required=True, help="directory for the MoE model (Hugging Face format)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new router and expert tables")
    args = parser.parse_args()
    try:
        print(f"wrote {upcycle_to_hf(args.checkpoint, args.preset, args.output, args.step, args.seed)}")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
