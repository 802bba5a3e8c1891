"""`fedem pretrain`: train Seshu from scratch, or continue pretraining a checkpoint on new text.

Both go through the same path: load text → balance languages by temperature → tokenise each line as
`[BOS] line [EOS]` → pack into blocks of `seq_len` → the shared Trainer loop. Continued pretraining
(`init_from`) takes the model and tokenizer from the checkpoint instead of building them.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from fedem.config import to_plain
from fedem.data.balance import balance
from fedem.data.corpus import Corpus, load_mono
from fedem.data.packing import Examples, pack
from fedem.model.load import load_model, load_tokenizer
from fedem.model.seshu import build_model, count_parameters
from fedem.provenance import weights_fingerprint, write_provenance
from fedem.train.config import PretrainConfig
from fedem.train.plot import plot_metrics
from fedem.train.trainer import run_training

log = logging.getLogger(__name__)


def tokenise_corpus(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int) -> Examples:
    """Pack every line of every language, shuffled together, into `seq_len`-token blocks."""
    lines = [line for lang_lines in corpus.values() for line in lang_lines]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = tokenizer([lines[i] for i in order], add_special_tokens=False)["input_ids"]
    documents = ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in encoded)
    return pack(documents, seq_len, tokenizer.pad_token_id)


def _model_and_tokenizer(cfg: PretrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.init_from is not None:
        return load_model(cfg.init_from), load_tokenizer(cfg.init_from)
    assert cfg.model is not None and cfg.tokenizer is not None  # guaranteed by PretrainConfig
    tokenizer = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, tokenizer), tokenizer


def pretrain(
    cfg: PretrainConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """Run (or resume) a pretraining job described by `cfg`; returns a JSON-able summary.

    The run folder `cfg.out` ends up holding the final checkpoint (config.json, model.safetensors,
    tokenizer), `checkpoint-N/` folders for resuming, `metrics.jsonl`, `metrics.png` and `fedem.json`.
    """
    model, tokenizer = _model_and_tokenizer(cfg)
    corpus = balance(
        load_mono(cfg.data.mono, "train", cfg.data.languages), cfg.data.temperature, cfg.train.seed
    )
    train_set = tokenise_corpus(corpus, tokenizer, cfg.data.seq_len, cfg.train.seed)
    heldout = _heldout(cfg, list(corpus))
    eval_set = tokenise_corpus(heldout, tokenizer, cfg.data.seq_len, cfg.train.seed) if heldout else None
    log.info(
        "%d parameters; %d training blocks of %d tokens (%d tokens)",
        count_parameters(model),
        len(train_set),
        cfg.data.seq_len,
        train_set.num_tokens,
    )
    provenance: dict[str, Any] = {"parameters": count_parameters(model), "train_tokens": train_set.num_tokens}
    if cfg.init_from is not None:
        provenance["init_from_sha256"] = weights_fingerprint(cfg.init_from)
    write_provenance(cfg.out, "pretrain", to_plain(cfg), **provenance)
    trainer = run_training(
        model,
        tokenizer,
        train_set,
        eval_set,
        cfg.train,
        cfg.out,
        heldout=heldout,
        resume=resume,
        callbacks=callbacks,
    )
    plot = plot_metrics(cfg.out)
    final = {k: v for row in trainer.state.log_history for k, v in row.items() if k.startswith("eval_")}
    return {
        "out": str(cfg.out),
        "steps": trainer.state.global_step,
        "parameters": provenance["parameters"],
        "train_tokens": provenance["train_tokens"],
        "plot": str(plot) if plot else None,
        "metrics": final,
    }


def _heldout(cfg: PretrainConfig, languages: list[str]) -> Corpus:
    """The first `eval_lines` held-out lines of each language, when the data folder has them."""
    if not cfg.data.mono.is_dir():
        return {}
    found = {lang for lang in languages if (cfg.data.mono / f"{lang}.valid.txt").is_file()}
    if not found:
        return {}
    corpus = load_mono(cfg.data.mono, "valid", sorted(found))
    return {lang: lines[: cfg.data.eval_lines] for lang, lines in corpus.items()}
