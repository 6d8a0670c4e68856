"""The NATS bus's connection: what its parts share, connecting, its state, its stream.

:class:`Link` is what a :class:`~engine.bus.NatsBus` and its parts share (the
nats-py client, the asyncio loop it runs in, the outbox, the counters).
:class:`Connection` makes the first connection and follows nats-py's
callbacks from then on; :func:`open_stream` binds a JetStream bus to its
stream once connected.
"""

from __future__ import annotations

import functools
import logging

import attrs
import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from .._names import describe_error
from ._nats_jetstream import Aio, ensure_stream
from ._nats_outbox import Outbox, Pacer
from ._nats_stored import Replies, StreamPublisher
from ._nats_url import NatsURL, require_tls
from ._nats_values import NatsSettings, NatsState, NatsTally

logger = logging.getLogger("engine.bus.nats")


@attrs.define(eq=False)
class Link:
    """What a NATS bus and its parts share.

    Attributes:
        url: the server's URL.
        settings: the bus's settings.
        loop: the asyncio loop nats-py runs in.
        client: the nats-py client.
        outbox: publishes and acks on their way to nats-py.
        pacer: how often publishing and acking yield to the scheduler.
        tally: the bus's counters.
        closed: set once the bus starts closing.
        aio: wraps an asyncio function to be awaited from trio, in ``loop``.
    """

    url: NatsURL
    settings: NatsSettings
    loop: trio_asyncio.TrioEventLoop
    client: Client
    outbox: Outbox
    pacer: Pacer
    tally: NatsTally
    closed: bool = False
    # Wraps an asyncio function to be awaited from trio, in the bus's loop.
    aio: Aio = attrs.field(init=False)

    @aio.default
    def _aio(self) -> Aio:
        return functools.partial(trio_asyncio.aio_as_trio, loop=self.loop)

    def check_open(self) -> None:
        """Raise ``trio.ClosedResourceError`` once the bus is closing.

        Raises:
            trio.ClosedResourceError: the bus is closed.
        """
        if self.closed:
            raise trio.ClosedResourceError(f"nats bus {self.settings.name!r} is closed")


class Connection:
    """A NATS bus's connection: the first connect, then nats-py's callbacks and the state."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.state = NatsState.RECONNECTING
        self._state_changed = trio.Event()
        self.connected_once = False
        self.client_started = False  # nats-py's close() needs its connect() first

    async def wait_state(self, wanted: NatsState) -> None:
        """Return once the state is ``wanted``.

        Raises:
            trio.ClosedResourceError: the bus closed first (unless waiting for ``closed``).
        """
        while self.state is not wanted:
            if self.state is NatsState.CLOSED:
                raise trio.ClosedResourceError(f"nats bus {self._link.settings.name!r} is closed")
            await self._state_changed.wait()

    def set_state(self, state: NatsState) -> None:
        """Move to ``state``; ``closed`` is final."""
        if self.state is NatsState.CLOSED or state is self.state:
            return
        self.state = state
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def connect(self) -> None:
        """Connect once, without retries; nats-py reconnects by itself from then on.

        Raises:
            trio.BrokenResourceError: the connection failed (a wrong host or
                password, or a ``tls://`` server that does not require TLS).
        """
        link, settings = self._link, self._link.settings
        if link.url.scheme == "tls":
            await require_tls(link.url)
        self.client_started = True
        try:
            # No retries on the first connection: a wrong host or password
            # fails here, with its reason, instead of being retried for ever.
            await link.aio(link.client.connect)(
                servers=[link.url.url],
                name=settings.name,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                allow_reconnect=False,
                max_reconnect_attempts=-1,
                reconnect_time_wait=settings.reconnect_wait,
                pending_size=settings.reconnect_buffer,
                **({} if settings.tls is None else {"tls": settings.tls}),
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise trio.BrokenResourceError(
                f"cannot connect to NATS at {link.url.redacted}: {describe_error(exc)}"
            ) from exc
        # Once connected, nats-py reconnects by itself (it reads this option then).
        link.client.options["allow_reconnect"] = True
        self.connected_once = True
        self.set_state(NatsState.CONNECTED)

    async def _on_error(self, error: Exception) -> None:
        if not self.connected_once:
            return  # the first connection failed: connect() raises it
        if isinstance(error, nats.errors.SlowConsumerError):
            self._link.tally.dropped += 1
            return
        link = self._link
        logger.warning(
            "nats bus %r (%s): %s", link.settings.name, link.url.redacted, describe_error(error)
        )

    async def _on_disconnected(self) -> None:
        link = self._link
        if not link.closed:
            logger.warning(
                "nats bus %r: lost %s, reconnecting", link.settings.name, link.url.redacted
            )
            self.set_state(NatsState.RECONNECTING)

    async def _on_reconnected(self) -> None:
        link = self._link
        link.tally.reconnects += 1
        logger.info("nats bus %r: reconnected to %s", link.settings.name, link.url.redacted)
        self.set_state(NatsState.CONNECTED)

    async def _on_closed(self) -> None:
        self.set_state(NatsState.CLOSED)


@attrs.frozen
class Stream:
    """A JetStream bus's stream, once bound.

    Attributes:
        js: nats-py's JetStream context.
        subjects: the subject patterns the stream captures, split into tokens.
        publisher: stores publishes in the stream and confirms them.
    """

    js: JetStreamContext
    subjects: tuple[tuple[str, ...], ...]
    publisher: StreamPublisher


async def open_stream(link: Link, connection: Connection) -> Stream:
    """Bind to the bus's stream (created if missing) and start taking its answers.

    Raises:
        trio.BrokenResourceError: the server refused to create or bind the stream.
    """
    settings = link.settings
    assert settings.stream is not None  # only called on a JetStream bus
    js = link.client.jetstream()
    try:
        subjects = await ensure_stream(
            link.aio, js, settings.stream, settings.subjects, settings.duplicate_window
        )
    except nats.errors.Error as exc:
        raise trio.BrokenResourceError(
            f"cannot create or bind stream {settings.stream!r}: {describe_error(exc)}"
        ) from exc
    replies = Replies(link.client.new_inbox())
    await link.aio(link.client.subscribe)(f"{replies.prefix}.*", cb=replies.on_reply)
    tally = link.tally

    def count_stored(ack: PubAck) -> None:
        tally.published += 1
        if ack.duplicate:
            tally.duplicates += 1

    def count_retry() -> None:
        tally.publish_retries += 1

    publisher = StreamPublisher(
        outbox=link.outbox,
        stream=settings.stream,
        retry_after=settings.publish_retry_after,
        max_unconfirmed=settings.max_unconfirmed,
        wait_connected=functools.partial(connection.wait_state, NatsState.CONNECTED),
        on_stored=count_stored,
        on_retry=count_retry,
        pacer=link.pacer,
        replies=replies,
    )
    return Stream(js, tuple(tuple(s.split(".")) for s in subjects), publisher)
