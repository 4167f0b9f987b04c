import sys

from rar_edge.tools.cli import main

sys.exit(main())
