"""A sample Python file: functions cut after their signature and docstring (used by the context tests)."""

import json
from pathlib import Path


def fibonacci(n):
    """Return the n-th Fibonacci number."""


def read_json(path: Path) -> dict:
    """Load a JSON file and return its content."""


def is_palindrome(text: str) -> bool:
    """True when text reads the same backwards, ignoring case."""


class Stack:
    """A last-in, first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        """Put item on top of the stack."""
