"""`svd-serve keys create|list|revoke`: what the CLI does with the `api_keys` table."""

from __future__ import annotations

import argparse
import sys

from serving.db.engine import make_engine, make_session_factory
from serving.db.migrate import check_migrated
from serving.errors import SvdServeError
from serving.security.api_keys import ApiKeyRecord, ApiKeyRepository
from serving.security.scopes import format_scopes, parse_scopes
from serving.settings import Settings


def _describe(record: ApiKeyRecord) -> str:
    state = "active" if record.active else f"revoked {record.revoked_at:%Y-%m-%d %H:%M}"
    return (f"{record.id}  svd_{record.prefix}_…  owner={record.owner_id}  scopes={format_scopes(record.scopes)}  "
            f"{record.created_at:%Y-%m-%d %H:%M}  {state}  {record.name or ''}").rstrip()


async def run_keys_command(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.resolved_database_url)
    try:
        await check_migrated(engine)
        repo = ApiKeyRepository(make_session_factory(engine))
        if args.keys_command == "create":
            record, key = await repo.create(args.owner, parse_scopes(args.scopes), name=args.name)
            print(key)
            print(f"created {_describe(record)}", file=sys.stderr)
            print("store the key now: it is not shown again (only its hash is kept)", file=sys.stderr)
        elif args.keys_command == "list":
            for record in await repo.list_keys(args.owner, include_revoked=args.all):
                print(_describe(record))
        else:
            print(f"revoked {_describe(await repo.revoke(args.key))}")
        return 0
    except SvdServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
