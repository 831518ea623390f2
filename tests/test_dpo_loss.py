"""The DPO loss and rewards equal a direct computation (the sigmoid loss of Rafailov et al., as trl
computes it) on hand-built log-probs, and DPOTask's forward gives the same from a model's logits."""
import math
from pathlib import Path

import pytest
import torch

import data_helpers
from doge_dist.config import ModelConfig
from doge_dist.data.chat_dataset import collate_pairs, lm_sample
from doge_dist.model import build_model
from doge_dist.train.dpo import DPOTask, dpo_loss, sequence_logps
from test_sft_loss import Engine

BETA = 0.1


def test_loss_and_rewards_on_hand_built_log_probs():
    pi_c, pi_r = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])
    ref_c, ref_r = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -4.0])
    losses, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, BETA)
    for i in range(3):
        margin = BETA * ((pi_c[i] - ref_c[i]) - (pi_r[i] - ref_r[i]))
        assert math.isclose(losses[i], -math.log(1 / (1 + math.exp(-margin))), rel_tol=1e-6)
        assert math.isclose(chosen[i], BETA * (pi_c[i] - ref_c[i]), abs_tol=1e-7)
        assert math.isclose(rejected[i], BETA * (pi_r[i] - ref_r[i]), abs_tol=1e-7)
    assert math.isclose(losses[0], math.log(1 + math.exp(-0.2)), rel_tol=1e-6)  # margin 0.1 * (1 - -1)


def test_sequence_logps_sums_completion_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100], [1, -100, -100, -100]])
    log_probs = logits.log_softmax(-1)
    expected = torch.stack([log_probs[0, 1, 3] + log_probs[0, 2, 5], log_probs[1, 0, 1]])
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    assert torch.allclose(sequence_logps(model, logits, labels), expected, atol=1e-6)


def two_pairs():
    """(pairs, padded batch): prompt (mask 0) + completion (mask 1); chosen and rejected of two pairs, different lengths."""
    pairs = [((torch.tensor([0, 5, 6, 7, 8, 1]), [0, 0, 0, 1, 1, 1]), (torch.tensor([0, 5, 6, 9, 1]), [0, 0, 0, 1, 1])),
             ((torch.tensor([0, 30, 31, 1]), [0, 0, 1, 1]), (torch.tensor([0, 30, 33, 34, 35, 1]), [0, 0, 1, 1, 1, 1]))]
    samples = [{"chosen": lm_sample([(c.numpy(), torch.tensor(cm).numpy())]),
                "rejected": lm_sample([(r.numpy(), torch.tensor(rm).numpy())]), "index": i}
               for i, ((c, cm), (r, rm)) in enumerate(pairs)]
    return pairs, collate_pairs(samples, pad_id=2)


def test_task_forward_matches_direct_computation():
    torch.manual_seed(0)
    policy = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    reference = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    pairs, batch = two_pairs()
    task = DPOTask()
    task.beta, task.reference = BETA, reference
    task.prepare(Engine(policy))
    with torch.enable_grad():
        loss_sum, count, _ = task.forward_loss(Engine(policy), batch)
    assert task.count(batch) == int(count) == 2

    def logp(model, ids, mask):
        with torch.no_grad():
            log_probs = model(ids[None]).logits[0].log_softmax(-1)
        return sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])

    direct, margins = [], []
    for (c, cm), (r, rm) in pairs:
        chosen = BETA * (logp(policy, c, cm) - logp(reference, c, cm))
        rejected = BETA * (logp(policy, r, rm) - logp(reference, r, rm))
        direct.append(-torch.nn.functional.logsigmoid(chosen - rejected))
        margins.append(chosen - rejected)
    assert torch.allclose(loss_sum, sum(direct), atol=1e-5)
    metrics = task._sums["train"].tolist()  # loss, rewards_chosen, rewards_rejected, margin, accuracy sums, pairs
    assert math.isclose(metrics[3], float(sum(margins)), abs_tol=1e-5)
    assert metrics[4] == sum(float(m > 0) for m in margins)


def test_a_filler_pair_of_a_validation_micro_batch_counts_nothing():
    """A rank's last validation micro-batch is filled up with pairs of index -1 (chat_dataset.scoring_nothing):
    the loss, every metric sum and the pair count are those of the real pairs alone."""
    from doge_dist.data.chat_dataset import scoring_nothing

    torch.manual_seed(0)
    policy = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    pairs, _ = two_pairs()
    samples = [{"chosen": lm_sample([(c.numpy(), torch.tensor(cm).numpy())]),
                "rejected": lm_sample([(r.numpy(), torch.tensor(rm).numpy())]), "index": i}
               for i, ((c, cm), (r, rm)) in enumerate(pairs)]
    results = []
    for rows in ([samples[0]], [samples[0], scoring_nothing(samples[1])]):
        task = DPOTask()
        task.beta, task.tables = BETA, {"valid": torch.tensor([[-30.0, -20.0], [-1.0, -90.0]])}
        with torch.no_grad():  # a validation forward
            loss_sum, count, _ = task.forward_loss(Engine(policy), collate_pairs(rows, pad_id=2))
        results.append([loss_sum.item(), count.item(), *task._sums["valid"].tolist()])
    assert results[1] == pytest.approx(results[0], abs=1e-6) and results[0][1] == 1


def test_moe_policy_logs_the_routing_statistics_of_its_training_pairs(monkeypatch):
    """The moe/* scalars of a MoE model (README: every task has pretraining's TensorBoard): DPO's own
    forward records the routing of the chosen and rejected sequences, their padding left out."""
    from doge_dist.model.moe_stats import token_entropies

    torch.manual_seed(0)
    policy = build_model(ModelConfig.from_preset("doge-tiny-moe")).train()
    _, batch = two_pairs()
    task = DPOTask()
    task.tables = {"train": torch.zeros(2, 2)}  # precomputed reference log-probs
    with torch.enable_grad():
        task.forward_loss(Engine(policy), batch)
    task.end_step()  # the loop's, after the step's micro-batches
    monkeypatch.setattr(task, "_means", lambda split, names, device: {"loss": 0.5})  # DPO's own sums need a process group
    metrics = task.log_metrics(torch.device("cpu"))

    with torch.no_grad():
        routings = policy(batch["input_ids"], token_mask=batch["token_mask"]).routings
    real = batch["token_mask"].reshape(-1).float()
    expected = sum((token_entropies(r) * real).sum() for r in routings) / len(routings) / real.sum()
    assert metrics["loss"] == 0.5
    assert math.isclose(metrics["moe/router_entropy"], float(expected), rel_tol=1e-6)
    assert 0.0 <= metrics["moe/unused_expert_fraction"] < 1.0


def test_precomputed_table_is_reused_only_for_its_own_reference(tmp_path, monkeypatch, capsys):
    """finetune.reference=precomputed: a resume reuses run.dir/reference_logps.pt, but a table left in
    run.dir by a run from another reference model, or of data preprocessed again into the same prefix
    (here with another prompt limit: as many pairs, other tokens), or scored in another precision (a rerun
    with train.bf16 switched), is recomputed, not trusted; the work is reported."""
    import torch.distributed as dist

    from chat_helpers import chat_tokenizer, prefixes
    from doge_dist.config import load_config
    from doge_dist.data.preprocess_chat import preprocess_chat
    from doge_dist.train.distributed import DistEnv, _free_port
    from doge_dist.train.dpo import REFERENCE_FILES

    source = Path(prefixes()["dpo_train"]).parent / "dpo_train.jsonl"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        env = DistEnv(0, 1, 0, torch.device("cpu"))
        tables = []
        fp32, bf16 = torch.float32, torch.bfloat16
        for seed, init_from, prompt_limit, dtype in ((0, "init_a", 48, fp32), (0, "init_a", 48, fp32), (0, "init_a", 16, fp32),
                                                     (1, "init_b", 16, fp32), (1, "init_b", 16, bf16), (1, "init_b", 16, bf16)):
            if len(tables) in (0, 2):
                data = preprocess_chat(str(source), str(tmp_path / "pairs"), str(chat_tokenizer()), kind="dpo",
                                       max_prompt_length=prompt_limit, max_completion_length=48,
                                       log=data_helpers.quiet).prefixes[0]
            (tmp_path / init_from).mkdir(exist_ok=True)
            (tmp_path / init_from / "config.json").write_text("{}")
            config = load_config(None, [f"run.dir={run_dir}", f"run.init_from={tmp_path / init_from}", f"data.train_data=[{data}]",
                                        "data.seq_length=128", "train.micro_batch_size=4"])
            torch.manual_seed(seed)
            task = DPOTask()
            task.setup(config, None)  # its reference: init_from's directory
            task.reference = build_model(ModelConfig.from_preset("doge-tiny")).eval().to(dtype)
            tables.append(task._precompute(config, env, "train").clone())
            assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [REFERENCE_FILES["train"]]
    finally:
        dist.destroy_process_group()
    assert torch.equal(tables[0], tables[1]) and not torch.allclose(tables[1], tables[2])
    assert not torch.allclose(tables[2], tables[3])
    assert not torch.equal(tables[3], tables[4]) and torch.equal(tables[4], tables[5])
    printed = capsys.readouterr().out
    assert printed.count("reference log-probs of the 16 train pairs, once") == 4
    assert "train reference log-probs: 4/4 micro-batches" in printed


def test_precomputed_reference_is_scored_in_prepare_not_inside_a_step(monkeypatch):
    """The loop calls Task.prepare once before step 1 with its throughput clock paused: scoring every
    pair with the reference there, not inside step 1's loss, keeps that work out of tok/s and the ETA."""
    from doge_dist.config import load_config

    pair = {"chosen": lm_sample([(torch.tensor([0, 5, 6, 1]).numpy(), torch.tensor([0, 0, 1, 1]).numpy())]),
            "rejected": lm_sample([(torch.tensor([0, 5, 7, 1]).numpy(), torch.tensor([0, 0, 1, 1]).numpy())]), "index": 0}
    table = torch.tensor([[-3.0, -4.0]], dtype=torch.float64)
    scored = []
    task = DPOTask()
    task.beta, task.reference = BETA, build_model(ModelConfig.from_preset("doge-tiny"))
    task._precompute_for = (load_config(None, ["train.eval_interval=0"]), None)
    monkeypatch.setattr(task, "_precompute", lambda config, env, split: scored.append(split) or table)
    engine = Engine(build_model(ModelConfig.from_preset("doge-tiny")))
    with torch.enable_grad():
        task.forward_loss(engine, collate_pairs([pair], pad_id=2))
    assert scored == []  # a step's loss scores nothing
    task.prepare(engine)
    assert scored == ["train"] and task.reference is None and torch.equal(task.tables["train"], table)


def test_a_micro_batch_reads_no_metric_back_to_the_host(monkeypatch):
    """On a GPU ``.cpu()`` and ``.item()`` wait for the device: DPO copied its five metric sums to the host
    at every micro-batch, and the MoE statistics their entropy sums at every micro-batch and layer. They
    stay on the device until the log point reads them (their values: the tests above)."""
    torch.manual_seed(0)
    policy = build_model(ModelConfig.from_preset("doge-tiny-moe")).train()
    _, batch = two_pairs()
    task = DPOTask()
    task.tables = {"train": torch.zeros(2, 2)}  # precomputed reference log-probs
    for name in ("cpu", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda *args, name=name, **kwargs: pytest.fail(f"Tensor.{name}()"))
    with torch.enable_grad():
        task.forward_loss(Engine(policy), batch)
    task.end_step()  # the loop's, after the step's micro-batches
    monkeypatch.undo()
    assert task._sums["train"][5] == 2 and task._sums["train"][4] in (0, 1, 2)  # pairs; accuracy: pairs with a positive margin
    assert len(task.moe_stats.window) == 1 and task.moe_stats.entropy[1] == batch["token_mask"].sum()
