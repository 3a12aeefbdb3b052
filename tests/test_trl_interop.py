"""A real client reads our data: TRL's DPOTrainer trains on a pairs dataset exactly as rayalign writes it."""

import pytest


def test_trl_dpo_trainer_runs_on_our_pairs(tiny_model, pairs_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from rayalign.models import load_tokenizer

    data = datasets.load_dataset("parquet", data_files=f"{pairs_dataset}/*.parquet", split="train")
    assert {"prompt", "chosen", "rejected"} <= set(data.column_names)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-3, beta=0.1, report_to=[], logging_steps=1, save_strategy="no",
                         use_cpu=True, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(tiny_model))
    result = trainer.train()
    assert result.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and losses[0] == pytest.approx(0.6931, abs=2e-3)  # step 1 at the reference: log 2
    assert any((before[k] - v.detach()).abs().max() > 0 for k, v in model.named_parameters())


def test_trl_dpo_precompute_holds_no_reference_model(tiny_model, pairs_dataset, tmp_path):
    """TRL 1.16's DPOTrainer with precompute_ref_log_probs on our pairs: no reference model held in training, the
    reference log-probs in TRL's columns `ref_chosen_logps` / `ref_rejected_logps`. TRL always computes them itself
    (a dataset that already has those columns fails with "duplicated columns"), so ours are left out here."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM

    from rayalign.models import load_tokenizer

    data = datasets.load_dataset("parquet", data_files=f"{pairs_dataset}/*.parquet", split="train")
    data = data.remove_columns([c for c in data.column_names if c.startswith("ref_")])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-3, beta=0.1, report_to=[], save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=data,
                             processing_class=load_tokenizer(tiny_model))
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    assert trainer.train().global_step == 1


def test_trl_kto_trainer_runs_on_our_kto_rows(tiny_model, pairs_dataset, tmp_path):
    """Rows in rayalign's kto schema (TRL's unpaired format: prompt, completion, label) train a KTOTrainer step."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import trl
    from transformers import AutoModelForCausalLM

    from rayalign.data.schemas import schema_for
    from rayalign.models import load_tokenizer

    pairs = pq.read_table(f"{pairs_dataset}/part-00000.parquet").to_pylist()
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen", "prompt_id": p["prompt_id"],
             "lang": p["lang"], "score": p[f"score_{side}"], "ref_logp": p[f"ref_logp_{side}"],
             "num_tokens": p[f"{side}_num_tokens"], "method": "lacomsa", "iteration": 1}
            for p in pairs for side in ("chosen", "rejected")]
    path = tmp_path / "kto.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_for("kto")[1]), path)
    data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    args = trl.KTOConfig(output_dir=str(tmp_path / "kto"), max_steps=1, per_device_train_batch_size=8,
                         learning_rate=1e-3, beta=0.1, report_to=[], save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0)
    trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=data,
                             processing_class=load_tokenizer(tiny_model))
    result = trainer.train()
    assert result.global_step == 1
    # step 1 at the reference: every row's reward and the KL point are 0, its loss 1 - sigmoid(0) = 0.5
    assert result.training_loss == pytest.approx(0.5, abs=1e-4)
