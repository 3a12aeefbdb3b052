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
