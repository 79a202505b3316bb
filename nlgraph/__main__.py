import sys

from nlgraph.cli import main

sys.exit(main())
