"""Turning tokenised text into training examples for the HF Trainer.

Pretraining packs documents end to end into fixed-length blocks — no padding except in the last
block, whose padded tail gets label -100 so it carries no loss. Fine-tuning keeps one example per
prompt/response pair, with labels -100 on the prompt so only the response is learned.
"""

from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss' ignore_index)


class Examples(Dataset[dict[str, torch.Tensor]]):
    """Rows of `input_ids`/`labels` (equal lengths within a row), as the Trainer expects."""

    def __init__(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.rows[index]
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.rows)


def pack(documents: Iterable[Sequence[int]], block_size: int, pad_id: int) -> Examples:
    """Concatenate token documents and cut them into blocks of `block_size` tokens.

    Args:
        documents: token ids per document, each already framed with BOS/EOS.
        block_size: tokens per block (the training sequence length).
        pad_id: fills the last block; its positions get label IGNORE_INDEX.
    """
    stream = [token for doc in documents for token in doc]
    rows = []
    for start in range(0, len(stream), block_size):
        block = stream[start : start + block_size]
        padding = block_size - len(block)
        rows.append((block + [pad_id] * padding, block + [IGNORE_INDEX] * padding))
    return Examples(rows)


def prompt_response(
    prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """One fine-tuning row: the loss is on the response tokens only; truncated to `max_length`."""
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return input_ids, labels


def pad_batch(features: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of variable-length rows; padded labels are IGNORE_INDEX.

    Right padding is safe for a causal model: padding after the text cannot change its logits.
    """
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = feature["input_ids"]
        labels[row, :length] = feature["labels"]
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
