"""Conversions between doge-dist checkpoints and Hugging Face transformers Doge directories."""
