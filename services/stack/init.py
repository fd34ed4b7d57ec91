"""One-shot set-up of a Kafka cluster and a ClickHouse server for slm-flywheel: create the topic catalogue
and apply the ClickHouse migrations. ``flywheel up`` does the same for the local stack; production runs this
as ``python -m services.stack.init`` (the ``init`` container of docker-compose.yml)."""

from __future__ import annotations

import logging
import sys

from services.core.settings import Settings


def initialise(settings: Settings) -> tuple[list[str], list[str]]:
    """(topics created, migrations applied); both empty when everything already exists."""
    from services.core.clickhouse import apply_migrations, client
    from services.core.topics import ensure_topics

    topics = ensure_topics(settings)
    ch = client(settings, ensure_database=True)
    try:
        migrations = apply_migrations(ch)
    finally:
        ch.close()
    return topics, migrations


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("flywheel.init")
    try:
        settings = Settings.load()
        topics, migrations = initialise(settings)
    except Exception as exc:
        log.error("initialisation failed: %s", exc)
        sys.exit(1)
    log.info("topics created: %s", ", ".join(topics) or "none (all existed)")
    log.info("migrations applied: %s", ", ".join(migrations) or "none (up to date)")


if __name__ == "__main__":
    main()
