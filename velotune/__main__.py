import sys

from velotune.cli import main

sys.exit(main())
