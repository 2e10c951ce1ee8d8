"""`svd-serve keys create|list|revoke`: what the CLI does with the `api_keys` table."""

from __future__ import annotations

import argparse
import json
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


def _as_json(record: ApiKeyRecord) -> dict[str, object]:
    return {"id": record.id, "prefix": record.prefix, "ownerId": record.owner_id,
            "scopes": sorted(scope.value for scope in record.scopes), "name": record.name,
            "createdAt": record.created_at.isoformat(),
            "revokedAt": record.revoked_at.isoformat() if record.revoked_at else None, "active": record.active}


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
            records = await repo.list_keys(args.owner, include_revoked=args.all)
            if args.json:
                print(json.dumps([_as_json(record) for record in records]))
            else:
                for record in records:
                    print(_describe(record))
        else:
            print(f"revoked {_describe(await repo.revoke(args.key))}")
        return 0
    except SvdServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
