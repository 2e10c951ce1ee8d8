"""Redis clients with their timeouts chosen here, never left to redis-py's defaults.

redis-py 8 gives up on a read after 5 s (`socket_timeout`; 4.x to 7.x waited forever). A command
that the server holds on purpose (XREAD BLOCK, BZPOPMIN) must therefore be read with a timeout
longer than the block, or an idle but healthy connection is dropped mid-wait: that is how every
event stream of a queued job was cut after 5 s. So there are two kinds of client:

- `command_client`: quick commands; a dead Redis is noticed within `COMMAND_TIMEOUT_S`.
- `blocking_client(block_s=...)`: for one blocking read of at most `block_s` at a time; its reads
  wait `block_s + BLOCKING_READ_MARGIN_S`.

`read_timeout_of` tells what a client was given, so a blocking reader can refuse a client that
would cut its wait short (`serving.events.EventStore.follow`, `serving.queue.QueueConsumer`).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
# How much longer than its block a blocking read may take: the server answers when the block
# ends, plus the round trip of a busy machine.
BLOCKING_READ_MARGIN_S = 5.0


def command_client(url: str, **options: Any) -> aioredis.Redis:
    """A client for quick commands (no blocking reads)."""
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S, **options
    )


def blocking_read_timeout(block_s: float) -> float:
    """The socket timeout for reads that the server may hold for up to `block_s`."""
    return block_s + BLOCKING_READ_MARGIN_S


def blocking_client(url: str, *, block_s: float, **options: Any) -> aioredis.Redis:
    """A client whose reads outlast a server-side block of up to `block_s` seconds."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=blocking_read_timeout(block_s),
        **options,
    )


def read_timeout_of(client: aioredis.Redis) -> float | None:
    """The read timeout `client`'s connections get (None: reads wait forever)."""
    pool = client.connection_pool
    # An unconnected connection built as the pool builds them: it holds the library's default
    # when nobody set one (the pool's kwargs then say nothing).
    value = pool.connection_class(**pool.connection_kwargs).socket_timeout
    return None if value is None else float(value)


def check_can_block(client: aioredis.Redis, block_s: float, what: str) -> None:
    """Refuse a client whose reads would time out before a `block_s` server-side block ends."""
    timeout = read_timeout_of(client)
    if timeout is not None and timeout <= block_s:
        raise RuntimeError(
            f"{what} blocks on Redis for {block_s:g} s but its client times out reads after {timeout:g} s; "
            "build it with serving.redis_clients.blocking_client"
        )
