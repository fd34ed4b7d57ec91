"""The endpoint's caps, each a setting (``FLYWHEEL_CLICKHOUSE_<FIELD>``) and a flag of the endpoint process
(``--<field>``), with a default for a small shared machine."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.settings import Settings


@dataclass(frozen=True)
class Limits:
    max_body_mb: int = 512  # raw request body
    max_decompress_ratio: float = 100.0  # decompressed / compressed body size (past 16 MiB)
    max_concurrent_queries: int = 32
    max_sessions: int = 64
    max_execution_time_s: int = 300  # no query may ask for more (or for none: 0 means unlimited)
    max_threads: int = 4  # per query; the default is this or the core count, whichever is smaller

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(**{f.name: getattr(settings, f"clickhouse_{f.name}") for f in dataclasses.fields(cls)})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            parser.add_argument(_flag(f.name), type=type(f.default), default=f.default, dest=f.name)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Limits:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def args(self) -> list[str]:
        """The endpoint process's command-line flags for these limits."""
        return [item for f in dataclasses.fields(self) for item in (_flag(f.name), str(getattr(self, f.name)))]

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb << 20

    @property
    def default_threads(self) -> int:
        return max(1, min(self.max_threads, os.cpu_count() or 1))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
