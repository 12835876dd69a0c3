"""loraredux optimizers inside transformers' Trainer, as any torch optimizer (`optimizers=(opt, None)`)."""

from __future__ import annotations

import pytest
import torch

import loraredux as lx
from tiny_models import tiny_llama, token_ids


class Blocks(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.roll(token_ids()[i % 2], shifts=i)
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("name", [n for n in lx.optim.available() if n != "adamw"])
def test_trainer_runs_our_optimizer_and_the_adapters_learn(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama(dtype=torch.float32)
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for _, a in lx.adapters(model):
            a.B.normal_(std=0.1)  # a mid-training state: pair methods act on both factors
    before = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    opt = lx.optim.create(name, model, lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Blocks(), optimizers=(opt, None)
    )
    result = trainer.train()
    assert result.global_step == 3
    after = lx.adapter_state_dict(model)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(k.endswith(".B") for k in moved)
    if name == "lora_fa":  # A frozen: only B moves
        assert not any(k.endswith(".A") for k in moved)
    else:
        assert any(k.endswith(".A") for k in moved)
