"""``coupon-engine``: the command line (contract section 4).

Exit 0 on success, 2 on bad input with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import campaign as cmp
from . import errors
from .auth import mint_member_token, resolve_secrets
from .campaign import ID_RE
from .cliargs import Parser, add_engine_args, fail
from .config import Settings, SettingsError, from_flags
from .http import alert_relay
from .ledger import cli as ledger_cli
from .ledger.guard import LostState, load_checked
from .logs import setup_logging
from .schemas import encoder
from .server import serve
from .service import Controls
from .store import Store, active_campaign, client_for, connect_with_retry, shard_count
from .store.embedded import EmbeddedRedisError, engine_redis


def settings_from(args: argparse.Namespace) -> Settings:
    return from_flags(vars(args))


def with_redis(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    async def run(url: str) -> int:
        client = client_for(settings, url, timeout=5.0)
        try:
            await connect_with_retry(client, 3)
            return await fn(client)
        finally:
            await client.aclose()

    try:
        with engine_redis(settings) as url:
            return asyncio.run(run(url))
    except EmbeddedRedisError as exc:
        return fail(str(exc))


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(settings_from(args))


def cmd_campaign_check(args: argparse.Namespace) -> int:
    try:
        c = cmp.read_campaign(args.file)
    except cmp.CampaignError as exc:
        return fail(str(exc))
    print(f"campaign {c.id}: {len(c.venues)} venues, {len(c.rounds)} rounds, "
          f"{c.total_stock} coupons, {c.total_stock * c.settlement_fen} of {c.budget_fen} fen")
    return 0


def cmd_campaign_load(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        c = cmp.read_campaign(args.file)
    except cmp.CampaignError as exc:
        return fail(str(exc))

    async def load(client: Any) -> int:
        try:
            plan = await load_checked(client, settings, c)
        except (cmp.CampaignError, LostState) as exc:
            return fail(str(exc))
        if plan.noop:
            print(f"campaign {c.id}: unchanged")
        else:
            print(f"campaign {c.id}: loaded ({len(plan.new_rounds)} new rounds, "
                  f"{len(plan.changed_rounds)} changed)")
        return 0

    return with_redis(settings, load)


def cmd_token(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.kind == "member":
        if not ID_RE.match(args.id or ""):
            return fail("member id must be 1-64 characters of A-Za-z0-9_.-")
        if args.ttl < 1:
            return fail("--ttl must be positive")
        print(mint_member_token(resolve_secrets(settings).member_jwt_secret, args.id, args.ttl))
        return 0
    if args.kind == "admin":
        secrets = resolve_secrets(settings)
        if args.id:
            named = dict(secrets.admins)
            if args.id not in named:
                return fail(f"no operator token named {args.id!r} (COUPON_ADMIN_TOKENS names"
                            f" {', '.join(sorted(named)) or 'none'})")
            print(named[args.id])
        elif secrets.admin_token:
            print(secrets.admin_token)
        else:
            return fail("only named operator tokens are configured; name one: token admin"
                        f" NAME ({', '.join(n for n, _ in secrets.named_admins)})")
        return 0
    return _venue_token(settings, args)


def _venue_token(settings: Settings, args: argparse.Namespace) -> int:
    async def act(client: Any) -> int:
        c = await active_campaign(client)
        if c is None:
            return fail("no campaign is loaded")
        if c.venue(args.id or "") is None:
            return fail(f"no venue {args.id!r} in campaign {c.id}")
        store = Store(client, c, settings)
        if args.revoke:
            n = await store.revoke_venue_key(args.id, None if args.revoke == "all" else args.revoke)
            print(f"revoked {n} key(s) of {args.id}")
            return 0
        if args.list:
            for key_id in await store.list_venue_keys(args.id):
                print(key_id)
            return 0
        print(await store.add_venue_key(args.id))
        return 0

    return with_redis(settings, act)


def cli_operator() -> str:
    """Who the audit records for a control run from the command line: it presents no
    token (it reaches Redis directly), so the login that ran it."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _control(settings: Settings, act: Callable[[Controls, str], Awaitable[Any]]) -> int:
    """Run one operator control against the engine's Redis; print the reply as JSON."""
    async def run(client: Any) -> int:
        c = await active_campaign(client)
        if c is None:
            return fail("no campaign is loaded")
        store = Store(client, c, settings, shards=await shard_count(client, c.id))
        try:
            reply = await act(Controls(store), cli_operator())
        except errors.Unavailable as exc:
            return fail(f"{exc.code}: {exc.message}", 1)
        except errors.EngineError as exc:
            return fail(f"{exc.code}: {exc.message}")
        finally:
            await store.wire.close()
        print(encoder.encode(reply).decode())
        return 0

    return with_redis(settings, run)


def cmd_round(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.action == "add-stock":
        return _control(settings, lambda ctl, who: ctl.add_stock(
            who, args.round, args.venue, args.units, args.reason))
    return _control(settings, lambda ctl, who: getattr(ctl, args.action)(
        who, args.round, args.reason))


def cmd_redemption(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    return _control(settings, lambda ctl, who: ctl.reverse(who, args.code, args.reason))


def cmd_alert_relay(args: argparse.Namespace) -> int:
    """Alertmanager webhook -> WeCom / DingTalk robot (engine/http/alert_relay.py)."""
    if urlsplit(args.target).scheme not in ("http", "https") or not urlsplit(args.target).netloc:
        return fail(f"--target must be an http(s) URL, got {args.target!r}")
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return fail(f"unknown --timezone {args.timezone!r}")
    secret = None
    if args.secret_file:
        try:
            secret = Path(args.secret_file).read_text("utf-8").strip()
        except OSError as exc:
            return fail(f"cannot read --secret-file {args.secret_file}: {exc.strerror}")
    try:
        alert_relay.parse_listen(args.listen)
    except ValueError as exc:
        return fail(str(exc))
    setup_logging("INFO")
    alert_relay.run(args.listen, args.target, args.format, args.timezone, secret,
                    args.runbook_base)
    return 0


def _shards_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stock-shards", metavar="S",
                   help="split the campaign's stock over S shards (slots) at its first load;"
                        " fixed afterwards (else COUPON_STOCK_SHARDS, 1)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not positive")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="coupon-engine")
    parser.add_argument("--version", action="version",
                        version=f"coupon-engine {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP engine")
    add_engine_args(p)
    p.add_argument("--campaign", type=Path, help="campaign file to load (default: the sample)")
    # Flags are read as text: engine/config.py parses and checks them, as it does
    # the environment, so both get the same one-line refusal.
    p.add_argument("--host")
    p.add_argument("--port", metavar="P", help="1..65535 (else COUPON_PORT, 8080)")
    p.add_argument("--workers", metavar="N", help="worker processes (else COUPON_WORKERS, 1)")
    p.add_argument("--allow-unsafe-redis", action="store_true",
                   help="run on a Redis whose settings could lose acknowledged writes")
    p.add_argument("--allow-weak-secrets", action="store_true",
                   help="development only: accept a member secret under 32 bytes or an"
                        " admin token under 16 characters (else COUPON_ALLOW_WEAK_SECRETS)")
    _shards_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("campaign", help="check or load a campaign file")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("check")
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_campaign_check)
    c = csub.add_parser("load")
    c.add_argument("file", type=Path)
    add_engine_args(c)
    _shards_arg(c)
    c.set_defaults(func=cmd_campaign_load)

    p = sub.add_parser("round", help="an operator's control of a round (audited)")
    rsub = p.add_subparsers(dest="action", required=True)
    for action, text in (("pause", "stop granting at once; grabs get round_paused"),
                         ("resume", "grant again"),
                         ("close", "close now; issued coupons stay valid")):
        c = rsub.add_parser(action, help=text)
        c.add_argument("round", metavar="ROUND")
        c.add_argument("--reason", required=True, metavar="TEXT", help="1-500 characters")
        add_engine_args(c)
        c.set_defaults(func=cmd_round)
    c = rsub.add_parser("add-stock", help="add N coupons to a venue's line, within budget")
    c.add_argument("round", metavar="ROUND")
    c.add_argument("venue", metavar="VENUE")
    c.add_argument("units", metavar="N", type=_positive_int)
    c.add_argument("--reason", required=True, metavar="TEXT", help="1-500 characters")
    add_engine_args(c)
    c.set_defaults(func=cmd_round)

    p = sub.add_parser("redemption", help="an operator's correction of a redemption (audited)")
    dsub = p.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("reverse", help="undo a mistaken redemption: the coupon is issued again")
    c.add_argument("code", metavar="CODE")
    c.add_argument("--reason", required=True, metavar="TEXT", help="1-500 characters")
    add_engine_args(c)
    c.set_defaults(func=cmd_redemption)

    p = sub.add_parser("token", help="print a credential the engine accepts")
    p.add_argument("kind", choices=["member", "venue", "admin"])
    p.add_argument("id", nargs="?", help="member or venue id; admin: the operator's name")
    p.add_argument("--ttl", type=int, default=3600, help="member token lifetime, seconds")
    p.add_argument("--revoke", metavar="KEY_ID|all", help="venue: revoke a key (or all)")
    p.add_argument("--list", action="store_true", help="venue: list key ids")
    add_engine_args(p)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("alert-relay",
                       help="turn Alertmanager's webhook into WeCom / DingTalk robot messages")
    p.add_argument("--listen", default="127.0.0.1:9095", metavar="HOST:PORT")
    p.add_argument("--target", required=True, metavar="URL", help="the group robot's webhook URL")
    p.add_argument("--format", required=True, choices=("wecom", "dingtalk"))
    p.add_argument("--secret-file", metavar="FILE",
                   help="DingTalk: the robot's signing secret (加签), read from this file")
    p.add_argument("--runbook-base", metavar="URL",
                   help="prefix for the rules' relative runbook links, e.g. the repository's URL")
    p.add_argument("--timezone", default="Asia/Shanghai", help="for the times in messages")
    p.set_defaults(func=cmd_alert_relay)

    ledger_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "token" and args.kind in ("member", "venue") and not args.id:
        return fail(f"token {args.kind} needs an id")
    try:
        return int(args.func(args))
    except SettingsError as exc:
        return fail(str(exc))


def package_version() -> str:
    try:
        return metadata.version("coupon-engine")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
