"""`fedem client …`: a donor's commands (docs/client.md).

`fedem client run` takes one turn in the adapter relay (`fedem.client.donor.run_donor`);
`fedem client push --resume` pushes versions that were trained but could not be pushed. Handlers
return JSON-able summaries, which `fedem.cli.main` prints; mistakes the user can fix (no hub or
token, a taken adapter, unreadable data) are `UserError`s.
"""

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedem.errors import UserError

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _hub(args: argparse.Namespace) -> str | None:
    return args.hub or os.environ.get("FEDEM_HUB")


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("FEDEM_TOKEN")
    if not token:
        raise UserError("this needs your token: pass --token or set FEDEM_TOKEN")
    return str(token)


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from pydantic import ValidationError

    from fedem.client.donor import DonorRun, run_donor

    hub = _hub(args)
    if not hub:
        raise UserError("which hub? pass --hub URL or set FEDEM_HUB")
    token = _token(args)
    given = {
        "adapter": args.adapter,
        "task": args.task,
        "data": args.data,
        "direction": args.direction,
        "lang": args.lang,
        "workdir": args.workdir,
        "wait": args.wait,
        "wait_max_s": args.wait_max,
        "margin_s": args.margin,
        "max_steps": args.max_steps,
        "eval_size": args.eval_size,
    }
    try:
        cfg = DonorRun(hub=hub, token=token, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return run_donor(cfg)


def cmd_push(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.client.donor import DEFAULT_WORKDIR, push_pending

    if not args.resume:
        raise UserError("pass --resume to push the versions waiting in the work folder")
    # only an explicit --hub redirects: each waiting version remembers the hub it was trained for
    summary = push_pending(args.workdir or DEFAULT_WORKDIR, _token(args), hub=args.hub)
    if not summary["pushed"] and summary["kept"]:
        raise UserError("nothing was pushed: " + "; ".join(k["reason"] for k in summary["kept"]))
    if not summary["pushed"]:
        summary["message"] = "nothing waiting to be pushed"
    return summary


def add_client_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `fedem client ACTION …` on the main parser's subcommands."""
    from fedem.cli import _add_common  # here, not at the top: fedem.cli imports this module

    client = commands.add_parser("client", help="donate training: lease, train and push an adapter")
    actions = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help)
        parser.add_argument("--hub", help="hub URL (default: $FEDEM_HUB)")
        parser.add_argument("--token", help="your token (default: $FEDEM_TOKEN)")
        parser.add_argument("--workdir", type=Path, help="downloads and runs (default: ~/.cache/fedem/donor)")
        _add_common(parser)
        parser.set_defaults(handler=handler)
        return parser

    run = action("run", cmd_run, "lease an adapter, train it on your data, push the new version")
    run.add_argument("--adapter", help="namespace/name (default: the hub picks the one most in need)")
    run.add_argument("--task", choices=["translate", "lm"], default="translate")
    run.add_argument(
        "--data", type=Path, required=True, help="english<TAB>other pairs (translate) or text (lm)"
    )
    run.add_argument("--direction", choices=["en-xx", "xx-en", "both"], help="translation direction(s)")
    run.add_argument("--lang", help="the data's language, if its file name does not say (en-hi.tsv, hi.txt)")
    run.add_argument("--wait", action="store_true", help="wait while the adapter is leased by someone else")
    run.add_argument(
        "--wait-max", type=float, metavar="SECONDS", help="give up waiting after this (default 3600)"
    )
    run.add_argument(
        "--margin", type=float, metavar="SECONDS", help="stop training this long before the lease ends (300)"
    )
    run.add_argument("--max-steps", type=int, help="training steps at most (default 200)")
    run.add_argument("--eval-size", type=int, help="examples held out to evaluate (default 64)")

    push = action("push", cmd_push, "push versions that were trained but not pushed yet")
    push.add_argument("--resume", action="store_true", help="push what waits in the work folder")
