"""Async context managers that say which ``async with`` to write when iterated.

``async for outcome in engine.map_batch(...)`` reads naturally and is wrong:
the batch belongs to a block, and what the block yields is iterated.
Python's own error ("'async for' requires an object with __aiter__ method")
does not say what to write instead; :class:`AsyncWithOnly` does.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import NoReturn, TypeVar, final

T = TypeVar("T")


@final
class AsyncWithOnly(AbstractAsyncContextManager[T]):
    """An async context manager that raises a ``TypeError`` naming its block when iterated.

    It defines ``__aiter__`` to say so, so ``isinstance(m, collections.abc.AsyncIterable)``
    is true of it; only the object its block yields iterates.
    """

    __slots__ = ("_hint", "_manager")

    def __init__(self, manager: AbstractAsyncContextManager[T], hint: str) -> None:
        self._manager = manager
        self._hint = hint

    async def __aenter__(self) -> T:
        return await self._manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        return await self._manager.__aexit__(exc_type, exc_value, traceback)

    def __aiter__(self) -> NoReturn:
        raise TypeError(self._hint)


def async_with_only(
    manager: AbstractAsyncContextManager[T], *, call: str, target: str, loop: str
) -> AsyncWithOnly[T]:
    """Wrap ``manager`` so that ``async for`` over it says which block to write.

    Args:
        manager: the async context manager a public function returns.
        call: how users spell the call, e.g. ``"engine.map_batch"``.
        target: the name the example binds with ``as``, e.g. ``"batch"``.
        loop: the example's loop variable, e.g. ``"outcome"``.
    """
    name = call.rpartition(".")[2]
    hint = (
        f"{name}(...) is an async context manager: write "
        f"`async with {call}(...) as {target}: async for {loop} in {target}: ...`"
    )
    return AsyncWithOnly(manager, hint)
