"""The chat template, stored in the Hugging Face tokenizer directory (``chat_template`` in
tokenizer_config.json) so that training data, ``tokenizer.apply_chat_template`` and every export agree.

The format is Doge's (Llama-3 style headers): ``bos``, then per message
``<|start_header_id|>ROLE<|end_header_id|>\\n CONTENT eos``. Three differences from the published
Doge template, on purpose: no blank line after each ``eos`` (with a sentencepiece tokenizer it
would only add untrained whitespace pieces); no "Cutting Knowledge Date: December 2024\\nToday Date:
..." lines added to a system message (fixed dates a small model cannot use, repeated in every system
turn of the training data and of every prompt);
and the assistant content is wrapped in ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns the loss mask: SFT data is
tokenized by the very call users make at inference time.

Why a separate "chat twin" directory: the template emits ``bos``/``eos`` as text, which must become
their ids (``split_special_tokens: false``); the pretraining twin keeps ``split_special_tokens: true``
so that a literal "</s>" inside a document stays text, exactly as sentencepiece encoded it. Inside a
chat *message* such text stays text too: ``doge_dist.data.chat.chat_ids`` (SFT/DPO data and
``launch/generate.py --chat``) encodes only the template's own markers as special ids. A plain
``apply_chat_template`` with this directory (an export's tokenizer) would turn a literal "</s>" in a
message into eos, and ``apply_chat_template(..., sanitize_control_tokens=True)`` (transformers 5.25)
encodes such text after a space differently from training: only ``chat_ids`` and ``launch/generate.py
--chat`` reproduce the training ids. Messages without such text get the same ids either way.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from doge_dist.data.errors import DataError, is_write_failure
from doge_dist.files import replace_directory

CHAT_SUBDIR = "chat"  # train_tokenizer writes the chat twin to OUTPUT_DIR/chat
HEADER = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n'"
DOGE_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- " + HEADER + " }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n' }}{%- endif %}"
)
FIX = "write one with data_tools/make_chat_tokenizer.py --tokenizer TOKENIZER --output-dir DIR"


def write_chat_tokenizer(source: str | os.PathLike, output_dir: str | os.PathLike, template: str = DOGE_CHAT_TEMPLATE) -> Path:
    """A Hugging Face tokenizer directory with ``template`` from a sentencepiece ``.model`` or an HF directory,
    replacing ``output_dir`` whole only once the new one is complete: a failed write (a full disk) or a kill
    never leaves it half-written or deleted."""
    check_replaceable(Path(source), Path(output_dir))
    output = Path(output_dir).resolve()  # a link is kept: its target is replaced, as save_hf does
    scratch = output.with_name(output.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        save_chat_tokenizer(source, scratch, template)
        replace_directory(scratch, output)
    except BaseException as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if is_write_failure(error):
            kept = f"{output} was left as it was" if output.exists() else "nothing was written"
            raise DataError(f"Writing the chat tokenizer {output} failed: {error} (a full disk or a file size limit?); "
                            f"{kept}.") from error
        raise
    return output


def save_chat_tokenizer(source: str | os.PathLike, directory: Path, template: str = DOGE_CHAT_TEMPLATE) -> None:
    """Write the chat twin of ``source`` into the new ``directory``."""
    from doge_dist.data.tokenizer import load_tokenizer

    load_tokenizer(source).save_hf(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config["split_special_tokens"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / "chat_template.jinja").unlink(missing_ok=True)  # a stale file there would win over the config key


def check_replaceable(source: Path, output: Path) -> None:
    """The output directory is replaced whole: refuse one that holds the source tokenizer (its own
    directory or a folder above it: the sentencepiece model and the pretraining twin would be deleted)
    or an existing directory that is not a tokenizer directory alone (its files, an exported model's weights,
    would be deleted)."""
    from ..convert.hf import model_files_in

    if source.resolve().is_relative_to(output.resolve()):
        raise DataError(f"--output-dir '{output}' holds the source tokenizer '{source}' and would be replaced whole; "
                        f"choose a new directory, e.g. '{source.parent if source.is_file() else source}/{CHAT_SUBDIR}'.")
    if output.exists() and not (output / "tokenizer_config.json").is_file():
        raise DataError(f"--output-dir '{output}' exists and is not a tokenizer directory; it would be replaced whole: "
                        "choose a new directory.")
    model_files = model_files_in(output)
    if model_files:
        raise DataError(f"--output-dir '{output}' holds a model ({', '.join(model_files)}) beside its tokenizer, which "
                        "would be deleted with the directory: choose a new directory.")


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_chat_tokenizer(path: str | os.PathLike, for_training: bool = True):
    """``AutoTokenizer`` of a chat tokenizer directory. For training its template must mark assistant
    turns ({% generation %}: the loss mask) and it must be fast (token offsets); generation needs a
    template only."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not (directory / "tokenizer_config.json").is_file():
        raise DataError(f"'{directory}' is not a Hugging Face tokenizer directory (no tokenizer_config.json); {FIX}.")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not template:
        raise DataError(f"Tokenizer '{directory}' has no chat template; {FIX}.")
    if not for_training:
        return tokenizer
    if not GENERATION_MARKER.search(template):  # not "add_generation_prompt" alone
        raise DataError(
            f"Tokenizer '{directory}' has no chat template with {{% generation %}} markers, which the loss mask "
            f"needs; {FIX}."
        )
    if not tokenizer.is_fast:
        raise DataError(f"Tokenizer '{directory}' is not a fast tokenizer: the loss mask needs token offsets.")
    return tokenizer
