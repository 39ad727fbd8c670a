"""``DEFAULT``: "use the client's default timeout" (``None`` means no limit at all)."""

from typing import Any

DEFAULT: Any = type("DefaultTimeout", (), {"__repr__": lambda self: "DEFAULT"})()
