"""The market-data service built on the engine (``python -m services.market``)."""
