"""The decode step (``model.decode.Decoder``) equals the model's own cached forward, one new token at
a time: fp32 logits within 1e-5 for every attention variant, GQA, MoE, biases, a keep window that
the cache outgrows, dynamic NTK past the trained length and batch 2; bf16 autocast logits within
bf16 rounding; its prepared weights follow every change of the parameters; the compiled step equals
the eager one. ``generate`` and launch/generate.py refuse out-of-range options and a tokenizer larger
than the model's vocabulary by name."""
import functools
import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_helpers import assets
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import save_hf
from doge_dist.model import build_model, shift_labels
from doge_dist.model.cache import KVCache
from doge_dist.model.decode import CompiledStep, Decoder
from doge_dist.model.generate import generate, next_token
from model_helpers import model_pair, perturb_all, randomise_dynamic_mask
from train_helpers import concurrently

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "v2_gqa": {},
    "v1": {"attention_variant": "v1", "num_key_value_heads": 4},
    "moe": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 4},
    "biases": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "keep_window": {"keep_window_size": 8},
    "own_head_dim": {"head_dim": 32},
    "dynamic_ntk": {"max_position_embeddings": 12, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
}


def _model(overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny", **overrides)).eval()
    randomise_dynamic_mask(model)
    perturb_all(model)
    return model


def _decoded(model, prompt, tokens, compiled: bool, autocast: bool = False) -> torch.Tensor:
    """The decoder's logits for each token fed after the prompt. ``compiled`` is checked to have been
    honoured: past the keep window the decoder runs its eager step, and a comparison of the compiled
    step with the eager one would compare the eager step with itself. In inference mode, as ``generate``
    runs the decoder: the compiled step's graph guards on it, so generate(compile=True) on the same model
    runs that graph (after a run under no_grad it compiled a second one for its inference tensors)."""
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        cache = KVCache()
        model(prompt, cache=cache)
        decoder = Decoder(model, cache, prompt.shape[1] + tokens.shape[1], compiled=compiled)
        logits = torch.stack([decoder.step(tokens[:, i]).float() for i in range(tokens.shape[1])])
    assert decoder.compiled == compiled and isinstance(decoder.forward, CompiledStep) == compiled  # fullgraph: no fallback
    return logits


def _both_ways(model, prompt, tokens, autocast: bool):
    """(decoder logits, model logits) for each token fed after the prompt."""
    ours = _decoded(model, prompt, tokens, compiled=False, autocast=autocast)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        reference_cache = KVCache()
        model(prompt, cache=reference_cache)
        reference = [model(tokens[:, i : i + 1], cache=reference_cache).logits[:, -1].float() for i in range(tokens.shape[1])]
    return ours, torch.stack(reference)


@pytest.mark.parametrize("case", CASES)
def test_decode_step_equals_the_cached_forward_fp32(case):
    model = _model(CASES[case])
    generator = torch.Generator().manual_seed(1)
    prompt, tokens = torch.randint(3, 512, (2, 6), generator=generator), torch.randint(3, 512, (2, 10), generator=generator)
    ours, reference = _both_ways(model, prompt, tokens, autocast=False)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_decode_step_under_bf16_autocast_matches_within_bf16_rounding():
    model = _model({})
    generator = torch.Generator().manual_seed(2)
    prompt, tokens = torch.randint(3, 512, (1, 6), generator=generator), torch.randint(3, 512, (1, 10), generator=generator)
    ours, reference = _both_ways(model, prompt, tokens, autocast=True)
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_half_precision_models_generate_on_any_cpu(monkeypatch):
    """oneDNN reorders an fp16 weight only on CPUs with AVX-512 fp16 (or AVX-NE-CONVERT), a bf16 one only
    with AVX-512 bf16: generate() raised on an fp16 model here, and would on a bf16 one on most desktop
    CPUs. Such weights go through F.linear: an fp16 model decodes its cached forward's logits within fp16
    rounding and greedy-generates its own forward's tokens; a bf16 model's logits without the packed
    weights are those with them, to the bit."""
    generator = torch.Generator().manual_seed(1)
    prompt, tokens = torch.randint(3, 512, (2, 6), generator=generator), torch.randint(3, 512, (2, 10), generator=generator)
    fp16 = _model({}).half()
    ours, reference = _both_ways(fp16, prompt, tokens, autocast=False)
    assert (ours - reference).abs().max() <= 4e-3 * reference.abs().max()
    out = generate(fp16, prompt, 8, temperature=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(out[:, 6:], fp16(out[:, :-1]).logits.argmax(-1)[:, 5:])
    packed = _decoded(_model({}).bfloat16(), prompt, tokens, compiled=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    bf16 = _model({}).bfloat16()
    assert torch.equal(_decoded(bf16, prompt, tokens, compiled=False), packed)
    from doge_dist.model.decode import _PREPARED

    linears = [module for kept in _PREPARED[bf16].values() for module in kept[1].modules() if hasattr(module, "packed")]
    assert linears and not any(linear.packed for linear in linears)


def test_prepared_weights_follow_parameter_changes():
    model = _model({})
    prompt = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    before = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place, as an optimizer step: the greedy choice changes
    after = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        expected = model(after[:, :-1]).logits.argmax(-1)[:, prompt.shape[1] - 1 :]
    assert not torch.equal(before, after)
    assert torch.equal(after[:, prompt.shape[1] :], expected)


def frozen_graphs() -> int:
    """How many of inductor's loaded modules hold frozen weights."""
    from torch._inductor.codecache import PyCodeCache

    return sum(any(name.startswith("_frozen_param") for name in vars(module)) for module in PyCodeCache.modules)


def test_compiled_decode_step_equals_the_eager_one_and_follows_new_weights():
    """generate(compile=True) runs the step as one compiled graph with the weights frozen in and attention
    over the whole (rounded-up) buffer, later positions masked: the eager step's fp32 logits with MoE
    layers and biases, and its bf16-autocast logits to the bit for the presets' layers (bf16 rounded
    where the eager step rounds, not once per fused kernel: inductor's emulate_precision_casts). After
    an in-place update of the weights it compiles again (a frozen graph would go on with the old
    weights) and frees the old graphs. Past the keep window the eager step runs: its choice among equal
    biases is topk's over exactly the cached keys, the model's own."""
    gc.collect()  # the compiled steps of models gone before this test go with them
    graphs = frozen_graphs()
    model = _model({**CASES["moe"], **CASES["biases"]})
    generator = torch.Generator().manual_seed(4)
    prompt, tokens = torch.randint(3, 512, (1, 6), generator=generator), torch.randint(3, 512, (1, 10), generator=generator)
    eager, compiled = (_decoded(model, prompt, tokens, compiled=c) for c in (False, True))
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    before = generate(model, prompt, 6, temperature=0, compile=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    after = generate(model, prompt, 6, temperature=0, compile=True)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(model, prompt, 6, temperature=0))
    assert frozen_graphs() == graphs + 1  # the old weights' graphs went with them (PyTorch kept them for good)
    dense = _model({})  # the presets' layers (v2, no biases) under bf16 autocast: the same bits
    eager_bf16, compiled_bf16 = (_decoded(dense, prompt, tokens, compiled=c, autocast=True) for c in (False, True))
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13):
        assert torch.equal(compiled_bf16, eager_bf16)
    else:  # 2.11/2.12: inductor's C++ kernels ignore emulate_precision_casts (pytorch#185337): within bf16 rounding
        assert (compiled_bf16 - eager_bf16).abs().max() <= 2 ** -6 * eager_bf16.abs().max()
    windowed, cache = _model({"keep_window_size": 8}), KVCache()
    windowed(prompt, cache=cache)
    assert Decoder(windowed, cache, 8, compiled=True).compiled and not Decoder(windowed, cache, 9, compiled=True).compiled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the compiled decode step on a GPU")
def test_cuda_compiled_decode_step_equals_the_eager_one():
    """A keep window as long as the generation (6 + 10 positions): the decoder compiles within it only."""
    model = _model({"keep_window_size": 16}).cuda()
    generator = torch.Generator().manual_seed(4)
    prompt, tokens = torch.randint(3, 512, (2, 6), generator=generator), torch.randint(3, 512, (2, 10), generator=generator)
    eager, compiled = (_decoded(model, prompt.cuda(), tokens.cuda(), compiled=c) for c in (False, True))
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()


def test_model_stays_copyable_and_picklable_after_generate(tmp_path):
    import copy

    model = _model({})
    generate(model, torch.tensor([[5, 6, 7]]), 3, temperature=0)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    assert torch.equal(generate(twin, torch.tensor([[5, 6, 7]]), 3, temperature=0),
                       generate(model, torch.tensor([[5, 6, 7]]), 3, temperature=0))


def test_generated_tokens_can_feed_a_training_step():
    """Generation runs in inference mode, but what it returns is an ordinary tensor: a training step on
    generated samples (self-training, preference pairs) can save it for the backward."""
    model = _model({})
    sample = generate(model, torch.tensor([[5, 6, 7]]), 4, temperature=0)
    assert not sample.is_inference()
    model.train()
    total, count = model.loss_sum(model(sample).logits, shift_labels(sample))
    (total / count).backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("case", ["v2_gqa", "keep_window", "dynamic_ntk", "moe"])
def test_a_left_padded_batch_generates_the_tokens_of_transformers(case):
    """Prompts of different lengths, left-padded with an attention mask as transformers' generate takes
    them: the same greedy tokens, each row those of its prompt alone, also once the cache outgrows the keep
    window and max_position_embeddings (the padding is neither attended nor counted in the positions)."""
    config = ModelConfig.from_preset("doge-tiny", **CASES[case], **({"router_layout": "hf_compat"} if case == "moe" else {}))
    ours, hf = model_pair(config)
    prompt = torch.randint(3, 512, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :3] = mask[2, :5] = 0
    prompt = prompt.masked_fill(mask == 0, config.pad_token_id)
    out = generate(ours.eval(), prompt, 16, temperature=0, attention_mask=mask, eos_token_id=None)
    expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=config.pad_token_id)
    assert torch.equal(out, expected)
    # without the mask, inferred from the pad token as transformers' generate infers it
    assert torch.equal(generate(ours, prompt, 16, temperature=0, eos_token_id=None), expected)
    if case != "moe":  # transformers' router mixes the tokens of a batch (hf_compat), so a row alone differs there
        assert torch.equal(out[2, 5:], generate(ours, prompt[2:, 5:], 16, temperature=0)[0])
    assert torch.equal(generate(ours, prompt[:1], 4, temperature=0, attention_mask=torch.ones_like(prompt[:1])),
                       generate(ours, prompt[:1], 4, temperature=0))
    with pytest.raises(ValueError, match="attention_mask of a right-padded prompt"):
        generate(ours, prompt, 4, temperature=0, attention_mask=mask.flip(-1))


def test_rows_that_reached_eos_are_padded_as_transformers_pads_them():
    """A finished row continues with the pad token (transformers' generate: pad_token_id), not its eos
    again; the config's pad token by default."""
    config = ModelConfig.from_preset("doge-tiny")
    ours, hf = model_pair(config)
    prompt = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    free = generate(ours.eval(), prompt, 8, temperature=0, eos_token_id=None)
    eos = int(free[0, 5])  # row 0's first token
    assert eos not in free[1, 5:].tolist() and eos != config.pad_token_id
    out = generate(ours, prompt, 8, temperature=0, eos_token_id=eos)
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=config.pad_token_id)
    assert torch.equal(out, expected)
    assert out[0, 6:].tolist() == [config.pad_token_id] * 7


def test_generation_stops_at_the_configs_eos_unless_told_otherwise():
    """As transformers' generate takes its eos from the model's generation config: without an
    eos_token_id the config's ends a row; None generates every token."""
    config = ModelConfig.from_preset("doge-tiny")
    ours, _ = model_pair(config)
    prompt = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    free = generate(ours.eval(), prompt, 8, temperature=0, eos_token_id=None)
    eos = int(free[0, 5])
    ours.config.eos_token_id = eos
    _, hf = model_pair(ours.config)
    out = generate(ours, prompt, 8, temperature=0)
    assert torch.equal(out, hf.generate(prompt, max_new_tokens=8, do_sample=False))
    assert out[0, 6:].tolist() == [config.pad_token_id] * 7
    assert torch.equal(generate(ours, prompt, 8, temperature=0, eos_token_id=None), free)


def test_generate_leaves_the_model_in_the_mode_it_was_in():
    """A training loop that samples between steps keeps its dropout; an evaluated model stays in eval."""
    model = _model({}).train()
    generate(model, torch.tensor([[5, 6, 7]]), 2, temperature=0)
    assert model.training and all(module.training for module in model.modules())
    generate(model.eval(), torch.tensor([[5, 6, 7]]), 2, temperature=0)
    assert not model.training

@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be 0 or more, got -1"),
    ({"temperature": -1.0}, "temperature must be 0"),
    ({"top_k": -5}, "top_k must be 0"),
    ({"top_p": 1.5}, "top_p must be between 0 and 1"),
    ({"top_p": -0.1}, "top_p must be between 0 and 1"),
])
def test_out_of_range_sampling_options_are_refused_by_name(options, message):
    """Not a shape error from the decoder, a topk error, a multinomial error or silent greedy decoding."""
    with pytest.raises(ValueError, match=message):
        generate(_model({}), torch.tensor([[5, 6, 7]]), **{"max_new_tokens": 3, "temperature": 1.0, **options})


def test_zero_new_tokens_returns_the_prompt_and_an_empty_prompt_is_refused():
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(_model({}), prompt, 0, temperature=0), prompt)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(_model({}), torch.zeros(1, 0, dtype=torch.long), 3, temperature=0)


def test_generate_command_refuses_bad_options_before_loading_the_model():
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", "no/such/run", "--top_p", "1.5"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "top_p must be between 0 and 1" in result.stderr and "got 1.5" in result.stderr


def test_generate_command_refuses_a_seed_out_of_range_before_loading_the_model():
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", "no/such/run", "--seed", str(10**30)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--seed must be a 64-bit integer" in result.stderr and "Traceback" not in result.stderr


def test_generate_command_names_tokenizer_for_a_checkpoint_without_its_runs_config(tmp_path):
    """A step directory copied out of its run has no config.yaml to name data.tokenizer: a TypeError before."""
    from train_helpers import single_process_run

    subprocess.run(["cp", "-r", str(single_process_run() / "checkpoints" / "step_00000010"), str(tmp_path)], check=True)
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "step_00000010")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "pass --tokenizer" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_sampling_stays_within_a_smaller_tokenizer():
    """A tokenizer with fewer ids than the model's (padded) vocabulary cannot decode the others: generate.py
    died decoding them after the model had loaded."""
    model = _model({})
    generator = torch.Generator().manual_seed(0)
    out = generate(model, torch.tensor([[5, 6, 7]]), 32, temperature=5.0, generator=generator, eos_token_id=None, vocab_limit=10)
    assert out[0, 3:].max() < 10 and out[0, 3:].min() >= 0
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, prompt, 8, temperature=0, vocab_limit=model.config.vocab_size),
                       generate(model, prompt, 8, temperature=0))


def test_top_p_keeps_the_smallest_set_of_tokens_reaching_it_as_transformers_does():
    """A prefix of the sorted tokens reaching top_p exactly is the whole set: the next token is cut
    (transformers' TopPLogitsWarper), and top_p 0 keeps the most likely token."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert torch.isfinite(TopPLogitsWarper(0.5)(None, logits.clone()))[0].tolist() == [True, False, False]
    generator = torch.Generator().manual_seed(0)
    assert {int(next_token(logits, 1.0, None, top_p, generator)) for _ in range(200) for top_p in (0.5, 0.0)} == {0}


def test_a_tiny_temperature_samples_the_most_likely_token():
    """logits / 1e-45 overflowed to inf and multinomial raised on NaN probabilities; the logits less their
    row maximum are divided instead: the same distribution, which at such a temperature is the argmax, and
    at an ordinary one the same draws as softmax(logits / temperature)."""
    from doge_dist.model.generate import next_token

    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(next_token(logits, 1e-45, None, None, None), logits.argmax(-1))
    expected = torch.multinomial((logits / 0.8).softmax(-1), 1, generator=torch.Generator().manual_seed(1)).squeeze(-1)
    assert torch.equal(next_token(logits, 0.8, None, None, torch.Generator().manual_seed(1)), expected)
    model, prompt = _model({}), torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, prompt, 8, temperature=1e-45, top_k=50, top_p=0.9),
                       generate(model, prompt, 8, temperature=0))


def test_generate_command_refuses_a_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    """Not an IndexError from the embedding: the tokenizer (512 ids) does not belong to the model (256)."""
    save_hf(build_model(ModelConfig.from_preset("doge-tiny", vocab_size=256)), tmp_path / "hf")
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "hf"),
                             "--tokenizer", str(assets().tokenizer_dir)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "has 512 ids but the model's vocab_size is 256" in result.stderr, result.stderr[-2000:]


def test_generate_command_checks_the_tokenizer_of_a_run_before_consolidating_its_checkpoint(tmp_path):
    """For a run directory the check came after the checkpoint was consolidated (a while for a large
    model); it reads the vocabulary from the checkpoint's meta file first, as export_hf.py does. Here the
    checkpoint has no weights at all: the tokenizer is what the command names."""
    import json

    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "doge_meta.json").write_text(json.dumps({"step": 4, "model": ModelConfig.from_preset("doge-tiny", vocab_size=256).to_dict()}))
    (step.parent / "latest").write_text(step.name)
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "run"),
                             "--tokenizer", str(assets().tokenizer_model)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "has 512 ids but the model's vocab_size is 256" in result.stderr, result.stderr[-2000:]


def test_generate_command_warns_when_it_runs_past_the_trained_positions(tmp_path):
    """A prompt plus max_new_tokens past max_position_embeddings under plain RoPE ran on silently (positions
    never trained: the text degrades); dynamic NTK, made for that, goes on without a word."""
    from doge_dist.model.generate import untrained_positions_note

    config = ModelConfig.from_preset("doge-tiny", vocab_size=512, max_position_embeddings=32, keep_window_size=32)
    dynamic = ModelConfig.from_preset("doge-tiny", vocab_size=512, max_position_embeddings=32, keep_window_size=32,
                                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert untrained_positions_note(dynamic, 11, 30) is None and untrained_positions_note(config, 2, 30) is None
    save_hf(build_model(config), tmp_path / "hf")
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "hf"), "--tokenizer",
                             str(assets().tokenizer_dir), "--prompt", "a b c d e f g h i j", "--max_new_tokens", "30",
                             "--temperature", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "past this model's max_position_embeddings (32) without RoPE scaling" in result.stderr, result.stderr


def test_generate_command_names_its_tokenizer_flag_and_chats_with_any_template(tmp_path):
    """A model directory without a tokenizer is told about --tokenizer; --chat needs a chat template
    only (the {% generation %} markers are for the SFT loss mask, which generation does not use);
    --compile gives the same reply."""
    import json
    import shutil

    save_hf(build_model(ModelConfig.from_preset("doge-tiny", vocab_size=512)), tmp_path / "hf")
    tokenizer = shutil.copytree(assets().tokenizer_dir, tmp_path / "tokenizer", ignore=shutil.ignore_patterns("chat"))
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    # three independent commands, run at the same time (each is one mostly single-threaded process)
    result, *replies = concurrently(*(
        functools.partial(subprocess.run, [sys.executable, "launch/generate.py", "--model", str(tmp_path / "hf"), *flags],
                          cwd=REPO, capture_output=True, text=True)
        for flags in (["--prompt", "a"], *(["--tokenizer", str(tokenizer), "--chat", "--prompt", "a", "--max_new_tokens", "4",
                                            "--temperature", "0", *compiled] for compiled in ([], ["--compile"])))))
    assert result.returncode == 2 and "Or pass this model's tokenizer with --tokenizer." in result.stderr, result.stderr[-2000:]
    assert all(result.returncode == 0 for result in replies), [result.stderr[-2000:] for result in replies]
    assert replies[0].stdout == replies[1].stdout


def test_generate_chat_without_a_chat_template_is_refused_before_loading_the_model(tmp_path):
    """--chat with a tokenizer that has no chat template (a pretraining run's sentencepiece model) was
    found out only after the model was loaded (a ZeRO checkpoint consolidated first): here the weights
    file is missing, and the tokenizer is what the command names."""
    save_hf(build_model(ModelConfig.from_preset("doge-tiny", vocab_size=512)), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    result = subprocess.run([sys.executable, "launch/generate.py", "--model", str(tmp_path / "hf"), "--tokenizer",
                             str(assets().tokenizer_model), "--chat", "--prompt", "a"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a Hugging Face tokenizer directory" in result.stderr, result.stderr[-2000:]
