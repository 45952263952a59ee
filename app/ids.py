"""Prefixed, time-ordered ids: sorting by id is sorting by creation, which makes cursor pages one index scan."""

import secrets
import time


def new_id(prefix: str) -> str:
    # 12 hex digits of milliseconds (good until year 10889) then 10 random hex digits.
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"
