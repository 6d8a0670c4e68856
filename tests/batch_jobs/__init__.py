"""Module-level functions that worker processes can import by name, for the bridge tests."""
