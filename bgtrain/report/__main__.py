import sys

from bgtrain.report.cli import main

sys.exit(main())
