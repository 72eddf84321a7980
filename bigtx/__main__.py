import sys

from bigtx.cli.main import main

sys.exit(main())
