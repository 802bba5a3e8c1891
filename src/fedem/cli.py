"""The `fedem` command: one subcommand per capability, each a thin call into the library.

Conventions every command keeps: writers take `--out DIR` and leave `fedem.json` (the resolved
config) beside their output; training commands take `--max-steps`; `--json` prints a one-line
machine-readable summary as the last line of stdout. Logs and progress bars go to stderr. A
`UserError` (a mistake the user can fix) prints one line and exits with status 2.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedem import __version__
from fedem.client.cli import add_client_parser
from fedem.errors import UserError
from fedem.estimate import add_estimate_parser
from fedem.hub.cli import add_hub_parser
from fedem.sim.cli import add_simulate_parser

log = logging.getLogger("fedem")

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _languages(value: str) -> list[str]:
    return [code.strip() for code in value.split(",") if code.strip()]


def _config_data(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML named by --config (or {}) with the positional key=value overrides applied."""
    from fedem.config import apply_overrides, load_yaml

    data = load_yaml(args.config) if args.config else {}
    return apply_overrides(data, args.overrides)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a flag's value into the config data (flags win over the YAML file)."""
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


# --- commands -------------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.model.tokenizer import train_tokenizer

    return train_tokenizer(
        data=args.data,
        out=args.out,
        vocab_size=args.vocab_size,
        temperature=args.temperature,
        languages=args.languages,
        pairs=args.pairs,
        seed=args.seed,
        compare=not args.no_compare,
    )


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.config import validate
    from fedem.train.config import PretrainConfig
    from fedem.train.pretrain import pretrain

    data = _config_data(args)
    if args.init_from is not None:
        data.pop("model", None)  # continued pretraining keeps the checkpoint's own shape and tokenizer
        data.pop("tokenizer", None)
    _set(data, "init_from", args.init_from)
    _set(data, "tokenizer", args.tokenizer)
    _set(data, "data.mono", args.data)
    _set(data, "data.languages", args.languages)
    _set(data, "train.max_steps", args.max_steps)
    _set(data, "out", args.out)
    cfg = validate(PretrainConfig, data, source=str(args.config or "pretrain"))
    return pretrain(cfg, resume=args.resume)


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.config import validate
    from fedem.train.config import FinetuneConfig
    from fedem.train.finetune import finetune

    data = _config_data(args)
    for key, value in (
        ("base", args.base),
        ("task", args.task),
        ("pairs", args.pairs),
        ("data", args.data),
        ("direction", args.direction),
        ("init", args.init),
        ("out", args.out),
        ("train.max_steps", args.max_steps),
        ("lora.r", args.rank),
        ("lora.alpha", args.alpha),
        ("lora.target_modules", args.targets),
    ):
        _set(data, key, value)
    cfg = validate(FinetuneConfig, data, source=str(args.config or "finetune"))
    return finetune(cfg, resume=args.resume)


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.merge import merge

    return merge(
        base=args.base,
        adapters=args.adapters,
        method=args.method,
        out=args.out,
        weights=args.weights,
        density=args.density,
        seed=args.seed,
        clip=args.clip,
        trim=args.trim,
    )


def _clip_bound(text: str) -> float | str:
    """`--clip median`, or a positive number: the largest ‖ΔW‖ an adapter keeps."""
    if text == "median":
        return text
    try:
        bound = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'median' or a positive number, not {text!r}") from None
    if not 0 < bound < float("inf"):
        raise argparse.ArgumentTypeError(f"the bound must be a positive number, not {text!r}")
    return bound


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.evaluate import evaluate

    return evaluate(
        model=args.model,
        out=args.out,
        gguf_file=args.gguf,
        translate_pairs=args.translate_pairs,
        adapter=args.adapter,
        mono=args.mono,
        pairs=args.pairs,
        languages=args.languages,
        max_lines=args.max_lines,
        max_pairs=args.max_pairs,
        directions=(args.directions,),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )


def cmd_lm_eval_tasks(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.lm_eval_tasks import export_lm_eval_tasks

    return export_lm_eval_tasks(
        out=args.out,
        mono=args.mono,
        pairs=args.pairs,
        languages=args.languages,
        max_lines=args.max_lines,
        max_pairs=args.max_pairs,
        directions=(args.directions,),
        max_new_tokens=args.max_new_tokens,
    )


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TextStreamer

    from fedem.generate import decoding_config, generate, load_for_inference

    cfg = decoding_config(
        strategy=args.strategy,
        num_beams=args.num_beams,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    model, tokenizer = load_for_inference(args.model, args.adapter)
    print(args.prompt, end="", flush=True)
    text = generate(
        model,
        tokenizer,
        args.prompt,
        cfg,
        TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    print(flush=True)  # the streamer leaves the cursor mid-line
    return {"prompt": args.prompt, "completion": text, "decoding": cfg.model_dump()}


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    from fedem.model.load import local_folder
    from fedem.serve import create_serve_app

    model_dir = local_folder(args.model, args.hub or os.environ.get("FEDEM_HUB"))
    name = args.name or (None if Path(args.model).is_dir() else args.model)  # a repo is named as given
    app = create_serve_app(
        model_dir, args.adapter, model_name=name, max_context=args.max_context, max_queue=args.max_queue
    )
    name = app.state.served.name
    log.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    return {"status": "stopped", "model": name}


# --- parser ---------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML recipe (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=4"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")


def _add_eval_data(parser: argparse.ArgumentParser) -> None:
    """The held-out data flags `evaluate` and `lm-eval-tasks` share, so both pick the same lines."""
    parser.add_argument("--mono", type=Path, default=Path("data/mono"), help="folder with <lang>.valid.txt")
    parser.add_argument(
        "--pairs", type=Path, default=Path("data/parallel"), help="folder with en-<lang>.test.tsv"
    )
    parser.add_argument("--languages", type=_languages)
    parser.add_argument("--max-lines", type=int, default=200, help="held-out lines per language")
    parser.add_argument("--max-pairs", type=int, default=50, help="FLORES test pairs per language")
    parser.add_argument("--directions", choices=["en-xx", "xx-en", "both"], default="en-xx")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="translation length cap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedem", description="Train Seshu, a multilingual Mamba LM, together."
    )
    parser.add_argument("--version", action="version", version=f"fedem {__version__}")
    parser.set_defaults(show_summary=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tokenizer = commands.add_parser("tokenizer", help="train and inspect tokenizers")
    tok_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok = tok_commands.add_parser("train", help="train the multilingual BPE and write its fertility report")
    tok.add_argument("--data", type=Path, default=Path("data/mono"), help="folder of <lang>.txt files")
    tok.add_argument("--vocab-size", type=int, default=16000)
    tok.add_argument("--out", type=Path, required=True)
    tok.add_argument("--temperature", type=float, default=3.0, help="language balancing: p ∝ n^(1/T)")
    tok.add_argument("--languages", type=_languages, help="comma-separated codes (default: all found)")
    tok.add_argument("--pairs", type=Path, help="FLORES test pairs for the premium (default: data/parallel)")
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--no-compare", action="store_true", help="skip the byte-level/English-only comparison")
    _add_common(tok)
    tok.set_defaults(handler=cmd_tokenizer_train)

    pre = commands.add_parser("pretrain", help="pretrain Seshu from scratch or continue pretraining")
    _add_config(pre)
    pre.add_argument("--from", dest="init_from", type=Path, help="continue pretraining this checkpoint")
    pre.add_argument("--tokenizer", type=Path, help="tokenizer folder (from `fedem tokenizer train`)")
    pre.add_argument("--data", type=Path, help="folder of <lang>.txt files, or one text file")
    pre.add_argument("--languages", type=_languages, help="comma-separated language codes")
    pre.add_argument("--max-steps", type=int)
    pre.add_argument("--out", type=Path)
    _add_common(pre)
    pre.set_defaults(handler=cmd_pretrain)

    fine = commands.add_parser("finetune", help="train a LoRA adapter (translation or language text)")
    _add_config(fine)
    fine.add_argument("--base", type=Path, help="base checkpoint folder")
    fine.add_argument("--task", choices=["translate", "lm"])
    fine.add_argument("--pairs", type=Path, help="en-<lang>.tsv training pairs (task translate)")
    fine.add_argument("--data", type=Path, help="text file or folder of <lang>.txt (task lm)")
    fine.add_argument("--direction", choices=["en-xx", "xx-en", "both"])
    fine.add_argument("--init", type=Path, help="continue training this adapter")
    fine.add_argument("--rank", type=int, help="LoRA rank r")
    fine.add_argument("--alpha", type=int, help="LoRA alpha (scale = alpha / r)")
    fine.add_argument("--targets", type=_languages, help="comma-separated target modules (default in_proj)")
    fine.add_argument("--max-steps", type=int)
    fine.add_argument("--out", type=Path)
    _add_common(fine)
    fine.set_defaults(handler=cmd_finetune)

    mrg = commands.add_parser("merge", help="merge LoRA adapters into a base checkpoint, exactly on ΔW")
    mrg.add_argument("--base", type=Path, required=True)
    mrg.add_argument("--adapters", type=Path, nargs="+", required=True)
    mrg.add_argument(
        "--method",
        default="linear",
        choices=["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "median", "trimmed_mean"],
    )
    mrg.add_argument("--weights", type=float, nargs="+", help="one weight per adapter")
    mrg.add_argument("--density", type=float, help="fraction of ΔW entries kept (ties, dare_*)")
    mrg.add_argument("--trim", type=float, help="fraction of adapters cut from each end (trimmed_mean)")
    mrg.add_argument(
        "--clip",
        type=_clip_bound,
        help="first clip each adapter's ‖ΔW‖ to 'median' (of the adapters') or to this bound",
    )
    mrg.add_argument("--seed", type=int, default=0, help="DARE's random drop")
    mrg.add_argument("--out", type=Path, required=True)
    _add_common(mrg)
    mrg.set_defaults(handler=cmd_merge)

    ev = commands.add_parser("evaluate", help="bits-per-byte and perplexity per language, chrF/BLEU")
    ev.add_argument(
        "--model", required=True, help="checkpoint folder, .gguf file, or hub repo org/name[@revision]"
    )
    ev.add_argument("--gguf", help="a GGUF file inside the --model folder or hub repo")
    ev.add_argument("--adapter", type=Path)
    _add_eval_data(ev)
    ev.add_argument("--translate-pairs", type=int, help="translate only the first N of --max-pairs")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", type=Path)
    _add_common(ev)
    ev.set_defaults(handler=cmd_evaluate)

    lmt = commands.add_parser("lm-eval-tasks", help="write fedem's evaluation as lm-evaluation-harness tasks")
    _add_eval_data(lmt)
    lmt.add_argument("--out", type=Path, required=True, help="folder for the task YAMLs (--include_path)")
    _add_common(lmt)
    lmt.set_defaults(handler=cmd_lm_eval_tasks)

    gen = commands.add_parser("generate", help="generate text, streaming to the terminal")
    gen.add_argument("--model", type=Path, required=True)
    gen.add_argument("--adapter", type=Path)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="greedy")
    gen.add_argument("--num-beams", type=int, help="beams (strategy beam; default 4)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens (strategy sample)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass (strategy sample)")
    gen.add_argument("--temperature", type=float, help="softmax temperature (strategy sample)")
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, help="sampling seed (default 0)")
    _add_common(gen)
    gen.set_defaults(handler=cmd_generate, show_summary=False)  # the text was already streamed

    srv = commands.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", required=True, help="checkpoint folder, or hub repo org/name[@revision]")
    srv.add_argument(
        "--hub", help="the hub a repo --model comes from (default: $FEDEM_HUB, else HF_ENDPOINT)"
    )
    srv.add_argument("--adapter", type=Path, help="LoRA adapter folder, merged into the model")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--name", help="model id clients use (default: the checkpoint folder's name)")
    srv.add_argument("--max-context", type=int, default=2048, help="prompt + max_tokens limit, in tokens")
    srv.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond this get a 429")
    _add_common(srv)
    srv.set_defaults(handler=cmd_serve, show_summary=False)  # it runs until stopped

    add_hub_parser(commands)
    add_client_parser(commands)
    add_simulate_parser(commands)
    add_estimate_parser(commands)
    return parser


def _configure_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=None, show_path=False, rich_tracebacks=False)
    handler.console.stderr = True
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], format="%(message)s"
    )
    for noisy in ("matplotlib", "PIL", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        summary = args.handler(args)
    except UserError as err:
        print(f"fedem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedem: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, default=str))
    elif args.show_summary:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any], indent: str = "") -> None:
    """A human-readable form of a command's summary (the JSON one is behind `--json`)."""
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_summary(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key}: {value:.4g}")
        elif not isinstance(value, list) or len(value) <= 12:
            print(f"{indent}{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
