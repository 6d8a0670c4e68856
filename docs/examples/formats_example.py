"""Decode one frame of each kind as the feed does, and print what is published for it.

Run it from the repository's root: ``python docs/examples/formats_example.py``.
The frames are Binance's documented examples (``tests/data/binance/``), a
spot decoder and a USDⓈ-M futures one each reading its own.
"""

from __future__ import annotations

import json

from services.market._events import (
    ControlFrame,
    Market,
    ServerShutdown,
    SubscriptionReply,
    decoder_for,
    market_of,
    normalise,
)

SPOT = [
    ("bnbbtc@trade", {"e": "trade", "E": 1672515782136, "s": "BNBBTC", "t": 12345,
                      "p": "0.001", "q": "100", "T": 1672515782136, "m": True, "M": True}),
    ("bnbbtc@aggTrade", {"e": "aggTrade", "E": 1672515782136, "s": "BNBBTC", "a": 12345,
                         "p": "0.001", "q": "100", "f": 100, "l": 105, "T": 1672515782136,
                         "m": True, "M": True}),
    ("bnbusdt@bookTicker", {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000",
                            "B": "31.21000000", "a": "25.36520000", "A": "40.66000000"}),
    ("bnbbtc@depth", {"e": "depthUpdate", "E": 1672515782136, "s": "BNBBTC", "U": 157,
                      "u": 160, "b": [["0.0024", "10"]], "a": [["0.0026", "100"]]}),
    ("bnbbtc@kline_1m", {"e": "kline", "E": 1672515782136, "s": "BNBBTC", "k": {
        "t": 1672515780000, "T": 1672515839999, "s": "BNBBTC", "i": "1m", "f": 100,
        "L": 200, "o": "0.0010", "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000",
        "n": 100, "x": False, "q": "1.0000", "V": "500", "Q": "0.500", "B": "123456"}}),
    ("bnbbtc@ticker", {"e": "24hrTicker", "E": 1672515782136, "s": "BNBBTC", "p": "0.0015",
                       "P": "250.00", "w": "0.0018", "x": "0.0009", "c": "0.0025", "Q": "10",
                       "b": "0.0024", "B": "10", "a": "0.0026", "A": "100", "o": "0.0010",
                       "h": "0.0025", "l": "0.0010", "v": "10000", "q": "18", "O": 0,
                       "C": 86400000, "F": 0, "L": 18150, "n": 18151}),
    ("bnbbtc@miniTicker", {"e": "24hrMiniTicker", "E": 1672515782136, "s": "BNBBTC",
                           "c": "0.0025", "o": "0.0010", "h": "0.0025", "l": "0.0010",
                           "v": "10000", "q": "18"}),
    ("btcusdt@avgPrice", {"e": "avgPrice", "E": 1693907033000, "s": "BTCUSDT", "i": "5m",
                          "w": "25776.86000000", "T": 1693907032213}),
]  # fmt: skip

FUTURES = [
    ("ethusdt@trade", {"e": "trade", "E": 1649839266194, "T": 1749354825200, "s": "ETHUSDT",
                       "t": 1000000000, "p": "10000.19", "q": "0.239000", "X": "MARKET",
                       "m": True}),
    ("bnbusdt@bookTicker", {"e": "bookTicker", "u": 400900217, "E": 1568014460893,
                            "T": 1568014460891, "s": "BNBUSDT", "b": "25.35190000",
                            "B": "31.21000000", "a": "25.36520000", "A": "40.66000000"}),
    ("btcusdt@depth", {"e": "depthUpdate", "E": 123456789, "T": 123456788, "s": "BTCUSDT",
                       "U": 157, "u": 160, "pu": 149, "b": [["0.0024", "10"]],
                       "a": [["0.0026", "100"]]}),
]  # fmt: skip

CONTROL = [
    {"result": None, "id": 1},
    {"code": 0, "msg": "Unknown property", "id": 5},
    {"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": 1770123456789}},
]


def show(url: str, frames: list[tuple[str, dict[str, object]]]) -> None:
    market = market_of(url)
    print(f"# {url} -> {market}")
    decode = decoder_for(market)
    for stream, data in frames:
        _, event = decode(json.dumps({"stream": stream, "data": data}))
        topic, payload = normalise(event)
        print(topic, payload.decode())


def main() -> None:
    show("wss://stream.binance.com:9443", SPOT)
    show("wss://fstream.binance.com", FUTURES)
    print("# control frames")
    decode = decoder_for(Market.SPOT)
    for frame in CONTROL:
        try:
            decode(json.dumps(frame))
        except SubscriptionReply as reply:
            print(f"SubscriptionReply id={reply.id!r} result={reply.result!r} error={reply.error}")
        except ServerShutdown as shutdown:
            print(f"ServerShutdown time={shutdown.time}")
        except ControlFrame:  # pragma: no cover - the two above are every kind
            raise


if __name__ == "__main__":
    main()
