"""The workloads behind the reference teacher, by name: the built-in ``banking77`` and ``nlupp`` (in ``data/``)
and any data set of your own registered under ``FLYWHEEL_HOME/reference-data/`` (``flywheel replay --data``,
``flywheel demo --data``). Where things live:

* ``contract.py``: the output contract an agent answers in, over a labelled data set (``Workload``);
* ``datasets.py``: reading data sets (the built-in ones and your CSV/JSONL file) into workloads;
* ``tables.py``: the built-in data sets' tools, replies and BANKING77's argument extractor;
* ``reference.py``: the stand-in teacher that answers from a workload.
"""

from __future__ import annotations

import functools
from pathlib import Path

from services.teacher.contract import Workload
from services.teacher.datasets import NAME_RE, load_registered, read_banking77, read_nlupp

WORKLOAD_NAMES = ("banking77", "nlupp")

REQUIRED_FILES = (
    "banking77/train.csv",
    "banking77/test.csv",
    "banking77/categories.json",
    "nlupp_banking/ontology.json",
    "nlupp_banking/fold0.json",
)


def missing_files(data_dir: Path) -> list[Path]:
    """The data files the built-in workloads need that ``data_dir`` lacks."""
    return [data_dir / rel for rel in REQUIRED_FILES if not (data_dir / rel).is_file()]


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: Path) -> Workload:
    return {"banking77": read_banking77, "nlupp": read_nlupp}[name](data_dir)


def load_workload(name: str, data_dir: Path | str, registry: Path | None = None) -> Workload:
    """A workload by name: a built-in one (read once per data directory) or one registered in ``registry``
    (``datasets.register``; read afresh, as it may have been registered again; ``DataSetError`` if it no
    longer reads)."""
    if name in WORKLOAD_NAMES:
        return _load_cached(name, Path(data_dir).resolve())
    if registry is not None and NAME_RE.match(name) and (registry / name / "examples.jsonl").is_file():
        return load_registered(registry / name)
    known = [*WORKLOAD_NAMES, *registered_names(registry)]
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(known)}")


def registered_names(registry: Path | None) -> list[str]:
    if registry is None or not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if (p / "examples.jsonl").is_file())


def load_workloads(data_dir: Path | str) -> dict[str, Workload]:
    return {name: load_workload(name, data_dir) for name in WORKLOAD_NAMES}
