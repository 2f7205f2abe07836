"""The built-in trainers: fedfuse's seeded AdamW loop for classification and LM, transformers' Trainer for SFT.

Classification and LM keep the hand-written loop: its batches come from one generator seeded by
(run seed, round, node), which the published benchmark figures and the resume test rely on. SFT uses
the maintained ``transformers.Trainer`` (mixed precision, gradient checkpointing and device placement
are its job); fedfuse hands it the tokenized conversations with labels only on assistant tokens.
"""

from __future__ import annotations

import tempfile

import torch
from torch.utils.data import Dataset

from fedfuse.training.client_datasets import ClientDatasets
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.loop import train
from fedfuse.training.trainers.protocol import TrainerSettings, TrainingRound, TrainResult


def loop_trainer(
    model: torch.nn.Module, data: ClientDatasets, settings: TrainerSettings, round: TrainingRound
) -> TrainResult:
    """fedfuse's seeded AdamW loop (classification and LM)."""
    loss = train(
        model,
        data.train,
        steps=round.steps,
        batch_size=settings.training.batch_size,
        learning_rate=settings.training.lr,
        seed=round.seed,
        dtype=round.dtype,
    )
    return TrainResult(loss)


class _TokenizedRows(Dataset):
    """A :class:`Tokenized` as the dict-per-example dataset ``transformers.Trainer`` expects."""

    def __init__(self, tokens: Tokenized) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        t = self.tokens
        return {"input_ids": t.input_ids[index], "attention_mask": t.attention_mask[index], "labels": t.labels[index]}


def trim_padding(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack right-padded examples and drop the padding columns no example of the batch uses.

    SFT chats are padded to ``max-length``; most are far shorter, and every dropped column is
    compute saved, with the same loss (the dropped positions are padding, labelled -100).
    """
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    width = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    return {key: value[:, :width] for key, value in batch.items()}


def sft_trainer(
    model: torch.nn.Module, data: ClientDatasets, settings: TrainerSettings, round: TrainingRound
) -> TrainResult:
    """``transformers.Trainer`` on the chat examples (loss on assistant tokens only), constant AdamW lr."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if len(data.train) == 0:
        raise ValueError("no local training examples")
    with tempfile.TemporaryDirectory(prefix="fedfuse-sft-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            max_steps=round.steps,
            per_device_train_batch_size=settings.training.batch_size,
            learning_rate=settings.training.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            seed=round.seed % 2**31,
            data_seed=round.seed % 2**31,
            bf16=round.dtype == torch.bfloat16,
            fp16=round.dtype == torch.float16,
            use_cpu=round.device.type == "cpu",
            gradient_checkpointing=settings.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False}
            if settings.training.gradient_checkpointing
            else None,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=model, args=arguments, train_dataset=_TokenizedRows(data.train), data_collator=trim_padding
        )
        output = trainer.train()
    model.eval()
    return TrainResult(float(output.training_loss))
