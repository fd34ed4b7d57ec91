import sys

from services.stack.clickhouse_endpoint.cli import main

sys.exit(main())
